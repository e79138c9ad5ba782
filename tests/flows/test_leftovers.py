"""A run sweeps the temporaries that killed runs left in its workdir, before anything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section


def test_the_next_run_sweeps_what_a_killed_run_left(tmp_path):
    workdir = tmp_path / "work"
    (workdir / "downloads" / "extracted").mkdir(parents=True)
    (workdir / "manifests").mkdir()
    # Left by a run killed with SIGKILL (its PID is gone): a half-extracted folder and a half-written manifest.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = workdir / "downloads" / "extracted" / f".pneumo-{dead.pid}-k2j4.partial"
    partial.mkdir()
    (partial / "IM-0001-0001.jpeg").write_bytes(b"half")
    manifest_tmp = workdir / "manifests" / f".pneumo-{dead.pid}-x8q1.tmp"
    manifest_tmp.write_bytes(b"{")
    legacy = workdir / "manifests" / ".manifest-0123.json.a1b2c3.tmp"  # the name earlier versions used
    legacy.write_bytes(b"{")
    past = time.time() - 3600
    for path in (partial, manifest_tmp, legacy):
        os.utime(path, (past, past))

    with pytest.raises(ValueError, match="does not exist"):
        full(source=str(tmp_path / "nonexistent"), workdir=str(workdir))
    assert not partial.exists() and not manifest_tmp.exists() and not legacy.exists()
