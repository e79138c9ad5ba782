"""What no retry can fix fails on the first try, and the CLI says why once, with the next step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> tuple[int, str, float]:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "flows/full.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    return run.returncode, run.stdout + run.stderr, time.monotonic() - started


def test_a_source_one_level_too_deep_is_refused_before_anything_starts(tmp_path):
    source = tmp_path / "chest_xray" / "train"  # NORMAL/ and PNEUMONIA/ directly inside: one level too deep
    for name in ("NORMAL", "PNEUMONIA"):
        (source / name).mkdir(parents=True)
        (source / name / "IM-0001-0001.jpeg").write_bytes(b"x")

    code, output, seconds = _cli("--source", str(source), "--workdir", str(tmp_path / "work"))
    assert code == 2 and output.strip().count("\n") == 0, output
    assert f"pass the folder above it: --source {source.parent}" in output and "Traceback" not in output
    assert not (tmp_path / "work").exists() and seconds < 30


def test_a_permanent_failure_fails_once_with_one_message(tmp_path):
    source = tmp_path / "chest_xray"  # the right layout, but no file in it is an image: found only at run time
    for name in ("NORMAL", "PNEUMONIA"):
        (source / "train" / name).mkdir(parents=True)
        (source / "train" / name / "IM-0001-0001.jpeg").write_bytes(b"x")

    code, output, seconds = _cli("--source", str(source), "--workdir", str(tmp_path / "work"))
    assert code == 1
    assert output.count("no readable image sizes") == 1, output
    assert "Traceback" not in output and "Retry 1/" not in output
    assert "not retried: trying again cannot fix this" in output and "--verbose" in output

    code, output, _ = _cli("--source", str(source), "--workdir", str(tmp_path / "work"), "--verbose")
    assert code == 1
    assert "Traceback" in output and "Retry 1/" not in output


def _one_class_source(tmp_path: Path) -> Path:
    source = tmp_path / "normal_only"
    (source / "train" / "NORMAL").mkdir(parents=True)
    for n in range(3):
        (source / "train" / "NORMAL" / f"IM-000{n}-0001.jpeg").write_bytes(b"x")
    return source


def test_a_source_without_one_class_is_refused_before_anything_starts_naming_the_folder(tmp_path):
    source = _one_class_source(tmp_path)
    archive = shutil.make_archive(str(tmp_path / "normal_only"), "zip", source)
    for given in (str(source), archive):
        code, output, seconds = _cli("--source", given, "--workdir", str(tmp_path / "work"))
        assert code == 2 and output.strip().count("\n") == 0, output
        assert "no images in train/PNEUMONIA" in output and "Traceback" not in output
        assert not (tmp_path / "work").exists() and seconds < 30
    (source / "train" / "PNEUMONIA").mkdir()
    (source / "train" / "PNEUMONIA" / "person1_virus_1.jpeg").write_bytes(b"x")
    (source / "val" / "PNEUMONIA").mkdir(parents=True)
    (source / "val" / "PNEUMONIA" / "person2_virus_2.jpeg").write_bytes(b"x")
    code, output, _ = _cli("--source", str(source), "--workdir", str(tmp_path / "work"))
    assert code == 2 and "no images in val/NORMAL" in output, output


def test_missing_kaggle_credentials_are_refused_first_with_the_hint(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "no-kaggle"))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "flows/full.py", "--workdir", str(tmp_path / "work")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "no Kaggle credentials found: create an API token" in lines[0] and "KAGGLE_USERNAME" in lines[0]
    assert "Resolution" not in run.stderr and not (tmp_path / "work").exists()
    assert time.monotonic() - started < 30
