"""The transform's process pool: real worker processes, and a fresh pool after a worker dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest

from pneumo.pool import ProcessPool


def test_runs_in_other_processes_and_returns_results():
    with ProcessPool(2) as pool:
        assert pool.run(pow, 3, 4) == 81
        assert pool.run(os.getpid) != os.getpid()


def test_calls_see_the_callers_current_environment_and_directory(tmp_path, monkeypatch):
    with ProcessPool(1) as pool:
        pool.run(os.getpid)  # workers exist before the change
        monkeypatch.setenv("PNEUMO_POOL_PROBE", "set after the pool started")
        monkeypatch.chdir(tmp_path)
        assert pool.run(os.getenv, "PNEUMO_POOL_PROBE") == "set after the pool started"
        assert pool.run(os.getcwd) == str(tmp_path)
        monkeypatch.delenv("PNEUMO_POOL_PROBE")
        assert pool.run(os.getenv, "PNEUMO_POOL_PROBE") is None


def test_a_dead_worker_fails_its_call_and_the_next_call_gets_a_fresh_pool():
    with ProcessPool(1) as pool:
        first = pool.run(os.getpid)
        with pytest.raises(BrokenProcessPool):
            pool.run(os._exit, 1)  # the worker dies mid-call, as under the OOM killer
        second = pool.run(os.getpid)
        assert second != first
        assert pool.run(pow, 2, 10) == 1024


def test_needs_a_worker():
    with pytest.raises(ValueError, match="at least 1"):
        ProcessPool(0)


OWNER = """
import os, signal, sys
from pneumo.pool import ProcessPool
pool = ProcessPool(2)
print(pool.run(os.getpid), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow  # a fresh interpreter and a process pool: in `make test`, not `make test-fast`
def test_workers_exit_when_the_process_that_owns_the_pool_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    worker = int(owner.stdout.readline())
    assert owner.wait(timeout=60) == -9
    owner.stdout.close()
    deadline = time.monotonic() + 20
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"worker {worker} outlived its owner"
        time.sleep(0.1)


@pytest.mark.slow  # a fresh interpreter and a process pool: in `make test`, not `make test-fast`
def test_a_pool_used_from_a_module_run_with_dash_m_starts_cleanly():
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "tests.code.pool_owner"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) > 0  # a worker pid
    assert "Warning" not in run.stderr, run.stderr
