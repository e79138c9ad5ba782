"""Inputs from outside training: files that are no regular file, oversized, hostile names, configs and zips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MAX_FILE_BYTES = 20_000_000  # pneumo.images.MAX_FILE_BYTES (spelled out: the test must also run on older code)
from pneumo.predict import list_inputs, score_inputs
from tests.predict_helpers import register_two, xray_pair

PNEUMO = [sys.executable, "-c", "from cli import main; main()"]


def hostile_folder(root: Path, shared_data: Path) -> Path:
    """A good film, a FIFO named b.jpeg (no writer) and a sparse file over the size bound named c.jpeg."""
    root.mkdir(parents=True)
    good, _ = xray_pair(shared_data)
    shutil.copy2(good, root / "a.jpeg")
    os.mkfifo(root / "b.jpeg")
    with open(root / "c.jpeg", "wb") as handle:  # sparse: costs no disk, but read whole it costs RAM
        handle.truncate(MAX_FILE_BYTES * 10)
    return root


def unblock_after(fifo: Path, seconds: float) -> threading.Event:
    """If the FIFO is still waited on after ``seconds``, open it for writing so the reader gets EOF."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=watch, daemon=True).start()
    return done


def test_batch_scoring_refuses_a_fifo_and_an_oversized_file_and_scores_the_rest(tmp_path, shared_data):
    """Item 12 (issue 15): the library side of flows/predict.py; before, the FIFO blocked the chunk forever."""
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    root = hostile_folder(tmp_path / "in", shared_data)
    done = unblock_after(root / "b.jpeg", 20)
    started = time.monotonic()
    rows = score_inputs(registry_root, "tinynet", "v0001", list_inputs(root))
    seconds = time.monotonic() - started
    done.set()
    assert seconds < 15, f"scoring waited {seconds:.0f} s on the FIFO"
    by_name = {row["relpath"]: row for row in rows}
    assert by_name["a.jpeg"]["error"] is None and by_name["a.jpeg"]["label"] in ("NORMAL", "PNEUMONIA")
    assert by_name["b.jpeg"]["error"] == "not a regular file (a pipe, device or socket)"
    assert by_name["c.jpeg"]["error"] == f"too large: {MAX_FILE_BYTES * 10} bytes exceeds the limit of {MAX_FILE_BYTES} bytes"


@pytest.mark.slow  # a `pneumo predict` process
def test_pneumo_predict_refuses_a_fifo_and_an_oversized_file_and_scores_the_rest(tmp_path, shared_data):
    """Item 12 (issue 15): before, `pneumo predict` hung on the FIFO (killed here at 60 s)."""
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    root = hostile_folder(tmp_path / "in", shared_data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        result = subprocess.run(
            [*PNEUMO, "predict", str(root / "a.jpeg"), str(root / "b.jpeg"), str(root / "c.jpeg"),
             "--registry", registry_root, "--json"],
            capture_output=True, text=True, timeout=60, env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("pneumo predict still blocked after 60 s (a FIFO named b.jpeg)")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(p["input"]).name for p in lines] == ["a.jpeg", "b.jpeg", "c.jpeg"]
    assert lines[0]["error"] is None and lines[0]["label"]
    assert lines[1]["error"] == "not a regular file (a pipe, device or socket)"
    assert lines[2]["error"].startswith("too large:")


def laughs(levels: int = 7) -> str:
    """A "billion laughs" YAML value: each anchored list repeats the one before nine times."""
    lists = ["&a [" + ",".join(["lol"] * 9) + "]"]
    for at in range(1, levels):
        name, before = "abcdefghij"[at], "abcdefghij"[at - 1]
        lists.append(f"&{name} [" + ",".join([f"*{before}"] * 9) + "]")
    return "epochs: [" + ", ".join(lists) + "]\n"


def run_refused(config: Path) -> str:
    """`pneumo run --config FILE`: refused before Prefect starts; its one stderr line."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        result = subprocess.run([*PNEUMO, "run", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pneumo run --config {config.name} still running after 60 s")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, f"{len(lines)} line(s), {len(result.stderr)} characters: {result.stderr[:300]}"
    return lines[0]


@pytest.mark.slow  # a `pneumo run` process per file
@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("laughs.yaml", laughs(), "anchors and aliases (&name, *name) are not allowed"),
        ("recursive.yaml", "train:\n  epochs: &a [*a]\n", "anchors and aliases (&name, *name) are not allowed"),
        ("big.toml", "# padding\n" * 20_000 + "[train]\nepochs = 0\n", "larger than 100000 bytes"),
        ("long.toml", f'[run]\nrecipe = "{"x" * 50_000}"\n', "--recipe xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (50000 characters)"),
    ],
)
def test_a_hostile_config_file_is_refused_in_one_short_line(tmp_path, name, text, expected):
    """Item 14 (issue 15): before, 264 bytes of YAML gave a 39 MB error line and a recursive
    anchor a 54-line RecursionError traceback."""
    config = tmp_path / name
    config.write_text(text)
    assert len(text) < 300 or name.endswith(".toml")
    assert expected in run_refused(config)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[train]\nepochs = true\n", "--epochs True: input should be a valid integer"),
        ("[run]\nshard_size = true\n", "--run.shard-size True: input should be a valid integer"),
        ('[run]\npercentile = "75"\n', "--run.percentile 75: input should be a valid number"),
        ("[train]\npatience = 2.0\n", "--train.patience 2.0: input should be a valid integer"),
    ],
)
def test_settings_from_a_file_have_strict_types(tmp_path, text, expected):
    """Item 15 (issue 15): before, `epochs = true` ran 1 epoch and `shard_size = true` gave shards of 1."""
    from tests.code.test_run_settings import parse
    from cli.run import UsageError

    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(UsageError) as refused:
        parse(["--config", str(config)])
    assert expected in str(refused.value)


def test_settings_keep_their_lax_but_exact_forms(tmp_path):
    """Strict types still take an int for a float and an array for a pair, from a file and the command line."""
    from tests.code.test_run_settings import parse

    config = tmp_path / "run.toml"
    config.write_text("[run]\npercentile = 80\n[transform]\ngrid = [5, 7]\n")
    chosen = parse(["--config", str(config), "--transform.augment.zoom", "0.9", "1.1", "--epochs", "3"])
    assert chosen.run.percentile == 80.0 and chosen.transform.grid == (5, 7)
    assert chosen.transform.augment.zoom == (0.9, 1.1) and chosen.train.epochs == 3


def test_predictions_csv_has_no_formulas_and_one_record_per_line(tmp_path, shared_data):
    """Item 18 (issue 15): before, `=HYPERLINK(...)` went verbatim into the first cell and a name
    holding a newline spanned two lines."""
    import csv

    from pneumo.predict import predictions_csv

    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    good, _ = xray_pair(shared_data)
    names = ['=HYPERLINK("evil.invalid";"x").jpeg', "+1.jpeg", "-2.jpeg", "@SUM(A1).jpeg",
             "two\nlines.jpeg", "plain.jpeg"]
    root = tmp_path / "in"
    root.mkdir()
    for name in names:
        shutil.copy2(good, root / name)
    rows = score_inputs(registry_root, "tinynet", "v0001", list_inputs(root))
    assert all(row["error"] is None for row in rows)
    text = predictions_csv(rows).decode()
    lines = text.splitlines()
    assert len(lines) == 1 + len(names), text
    cells = [line.split(",")[0].strip('"') for line in lines[1:]]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@"))], cells
    records = list(csv.DictReader(text.splitlines()))
    assert sorted(record["relpath"] for record in records) == sorted(
        ["'" + name if name[0] in "=+-@" else name.replace("\n", "\\n") for name in names]
    )


def zip_of(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    import warnings
    import zipfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name, and writes it anyway
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "entries, says",
    [
        ([("a.jpeg", b"first"), ("a.jpeg/b.jpeg", b"second")],
         "entry 'a.jpeg/b.jpeg' in {zip} needs a folder 'a.jpeg', but the archive also holds a file 'a.jpeg' by that name"),
        ([("a.jpeg/b.jpeg", b"second"), ("a.jpeg", b"first")],
         "entry 'a.jpeg/b.jpeg' in {zip} needs a folder 'a.jpeg', but the archive also holds a file 'a.jpeg' by that name"),
        ([("train/NORMAL/x.jpeg", b"first"), ("train/NORMAL/x.jpeg", b"replaced")],
         "entry 'train/NORMAL/x.jpeg' appears twice in {zip}; remove one copy"),
    ],
)
def test_zip_entries_that_clash_are_refused_naming_the_entry(tmp_path, entries, says):
    """Item 16 (issue 15): before, `[Errno 17] File exists: '…/.pneumo-…partial/a.jpeg'` (a temporary
    path), and a duplicate entry silently replaced the first."""
    from pneumo import download

    archive = zip_of(tmp_path / "in.zip", entries)
    with pytest.raises(download.UnsafeArchive) as refused:
        download.fetch(str(archive), tmp_path / "cache")
    assert str(refused.value) == says.format(zip=archive)
    assert not list((tmp_path / "cache").rglob("*.jpeg")), "nothing extracted is left visible"


def outside_folder(tmp_path: Path, shared_data: Path) -> Path:
    """Three PNEUMONIA films in a folder outside any dataset or input."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in sorted((shared_data / "train" / "PNEUMONIA").iterdir())[:3]:
        shutil.copy2(path, outside / path.name)
    return outside


def test_a_symlinked_class_folder_leading_outside_is_refused_by_the_manifest(tmp_path, shared_data):
    """Item 13 (issue 15): before, `train/PNEUMONIA -> /outside` put the three outside files into the manifest."""
    from pneumo.download import build_manifest

    outside = outside_folder(tmp_path, shared_data)
    root = tmp_path / "dataset"
    (root / "train" / "NORMAL").mkdir(parents=True)
    for path in sorted((shared_data / "train" / "NORMAL").iterdir())[:2]:
        shutil.copy2(path, root / "train" / "NORMAL" / path.name)
    (root / "train" / "PNEUMONIA").symlink_to(outside, target_is_directory=True)
    (root / "train" / "NORMAL" / "more").symlink_to(root / "train" / "NORMAL", target_is_directory=True)
    manifest = build_manifest(root)
    assert sorted(record.relpath.split("/")[1] for record in manifest.records) == ["NORMAL", "NORMAL"]
    reasons = {entry.relpath: entry.reason for entry in manifest.quarantine}
    assert reasons == {
        "train/PNEUMONIA": "symlinked folder points outside the dataset (not read)",
        "train/NORMAL/more": "symlinked folder inside a class folder (not followed)",
    }


def test_batch_scoring_reports_a_symlinked_folder_instead_of_skipping_it(tmp_path, shared_data):
    """Item 13 (issue 15): before, the batch flow silently skipped such a folder (`scored 1 of 2`)."""
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    outside = outside_folder(tmp_path, shared_data)
    root = tmp_path / "in"
    (root / "NORMAL").mkdir(parents=True)
    good, _ = xray_pair(shared_data)
    shutil.copy2(good, root / "NORMAL" / good.name)
    (root / "PNEUMONIA").symlink_to(outside, target_is_directory=True)
    (root / "NORMAL" / "link.jpeg").symlink_to(outside / sorted(os.listdir(outside))[0])
    rows = {row["relpath"]: row for row in score_inputs(registry_root, "tinynet", "v0001", list_inputs(root))}
    assert rows[f"NORMAL/{good.name}"]["error"] is None
    assert rows["PNEUMONIA"]["error"] == "symlinked folder points outside the input (not read)"
    assert rows["NORMAL/link.jpeg"]["error"] == "symlink points outside the input (not read)"
    assert len(rows) == 3
