"""`kill -9` in the middle of the transform, then a re-run, gives the shards of a clean run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
from prefect.settings import PREFECT_API_URL

from flows.full import full
from pneumo import shards
from pneumo.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--shard-size", "10", "--runner", "threads", "--workers", "1", "--epochs", "3", "--patience", "3"]


def cli(source: Path, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [sys.executable, "flows/full.py", "--source", str(source), "--workdir", str(workdir), *ARGS],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so the kill reaches every process of the run
    )


def shard_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "shards").rglob("*.h5"))


def digests(index_uri: str) -> dict[str, str]:
    return {entry["name"]: entry["sha256"] for entry in shards.read_index(index_uri)["shards"]}


def test_kill_9_during_transform_then_rerun_gives_clean_shards(subset_source, tmp_path):
    workdir = tmp_path / "killed"
    run = cli(subset_source, workdir)
    deadline = time.monotonic() + 240
    while len(shard_files(workdir)) < 3:
        assert run.poll() is None, f"the run ended before it could be killed:\n{run.stdout.read()}"
        assert time.monotonic() < deadline, "no shard appeared in time"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not list(workdir.rglob("index.json")), "killed before the transform finished, so there is no index"

    # Whatever is visible after the kill is a complete shard.
    for path in shard_files(workdir):
        with h5py.File(path, "r") as f:
            assert len(f["labels"]) == len(f["features"]) > 0

    rerun = cli(subset_source, workdir)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    killed_index = next(workdir.rglob("index.json"))

    clean = full(
        source=str(subset_source), workdir=str(tmp_path / "clean"), shard_size=10,
        train=TrainConfig(epochs=3, patience=3), runner="threads", workers=1,
    )
    assert digests(str(killed_index)) == digests(clean["shards_index"])
    for name, digest in digests(str(killed_index)).items():
        assert hashlib.sha256((killed_index.parent / name).read_bytes()).hexdigest() == digest
