"""A results key that cannot be trusted stops `pneumo run` and `pneumo predict-batch` before any work:
one line naming the key, what is wrong and the fix, exit 2 (issue 23, item 2). Prefect would only log
the failed write of each result record and run uncached, registering the same version again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pneumo import signatures
from tests.helpers import pneumo_command

GOOD_KEY = "0123456789abcdef" * 4


def _source(tmp_path: Path) -> Path:
    """A source whose layout passes the checks made before the run (its files are no images)."""
    source = tmp_path / "chest_xray"
    for name in ("NORMAL", "PNEUMONIA"):
        (source / "train" / name).mkdir(parents=True)
        (source / "train" / name / "IM-0001-0001.jpeg").write_bytes(b"x")
    return source


def _key_file(home: Path, kind: str) -> Path:
    path = home / ".config" / "pneumo" / "results.key"
    path.parent.mkdir(parents=True)
    if kind == "group-readable":
        path.write_text(GOOD_KEY)
        path.chmod(0o640)
    elif kind == "empty":
        path.write_text("")
        path.chmod(0o600)
    elif kind == "symlink":
        target = home / "real.key"
        target.write_text(GOOD_KEY)
        target.chmod(0o600)
        path.symlink_to(target)
    return path


BAD_KEYS = [
    ("group-readable", "can be read by others (mode 640): chmod 600"),
    ("empty", "is empty: remove it to have a new one made"),
    ("symlink", "is a symbolic link, not a regular file: remove it"),
    ("short variable", "PNEUMO_RESULTS_KEY (the results key) is too short (9 characters, fewer than 32): set it"),
]


def _env(home: Path, kind: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != signatures.KEY_ENV}
    env["HOME"] = str(home)
    if kind == "short variable":
        env[signatures.KEY_ENV] = "too-short"
    else:
        _key_file(home, kind)
    return env


@pytest.mark.slow  # CLI processes: in `make test`, not `make test-fast`
@pytest.mark.parametrize("kind, says", BAD_KEYS, ids=[kind for kind, _ in BAD_KEYS])
def test_a_bad_results_key_stops_the_run_before_any_work_in_one_line(tmp_path, kind, says):
    home, work = tmp_path / "home", tmp_path / "work"
    env = _env(home, kind)
    run = subprocess.run(pneumo_command("run", "--source", str(_source(tmp_path)), "--workdir", str(work)),
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and says in run.stderr and run.stdout == "", run.stderr
    if kind != "short variable":
        assert str(home / ".config" / "pneumo" / "results.key") in run.stderr
    # Nothing ran: no Prefect server was started, no stage wrote into the workdir.
    assert not (home / ".prefect").exists() and not [p for p in work.rglob("*") if p.is_file()]


def test_a_bad_results_key_stops_predict_batch_too(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    run = subprocess.run(pneumo_command("predict-batch", "--input", str(_source(tmp_path)), "--workdir", str(work)),
                         env=_env(home, "group-readable"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stdout + run.stderr
    assert "results key" in run.stderr and "chmod 600" in run.stderr and not work.exists()


def test_a_key_file_that_cannot_be_made_is_said_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(signatures.KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config").write_text("a file where the folder should be")
    problem = signatures.key_problem()
    assert problem and "cannot be read or created" in problem and signatures.KEY_ENV in problem
    monkeypatch.setenv(signatures.KEY_ENV, GOOD_KEY)
    assert signatures.key_problem() is None


def test_a_deployment_run_fails_on_a_bad_key_before_its_first_task(monkeypatch):
    """A deployment's flow runs without the CLI: it stops where it first asks for its result storage."""
    from tasks.result_storage import signed_storage_block

    monkeypatch.setenv(signatures.KEY_ENV, "too-short")
    with pytest.raises(signatures.BadKey, match="too short"):
        signed_storage_block("/nowhere/prefect-results")
