"""What no retry can fix fails on the first try, and the CLI says why once, with the next step."""

from __future__ import annotations

import os
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
