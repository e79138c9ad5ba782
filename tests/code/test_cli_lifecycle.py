"""The CLI's temporary Prefect server ends with the CLI, even when the CLI is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# real CLI runs against real Prefect servers, killed on purpose: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _temporary_server(cli: psutil.Process) -> psutil.Process | None:
    for child in cli.children(recursive=True):
        try:
            if "uvicorn" in child.cmdline() and "prefect.server.api.server:create_app" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (the orphan's new parent may not reap it at once)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_temporary_prefect_server_dies_with_a_killed_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    for name in ("NORMAL", "PNEUMONIA"):  # passes the checks before the server starts; fails later, if ever reached
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        (tmp_path / "data" / "train" / name / "IM-0001-0001.jpeg").write_bytes(b"x")
    cli = subprocess.Popen(
        [sys.executable, "flows/full.py", "--source", str(tmp_path / "data"), "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        deadline = time.monotonic() + 300
        while server is None:
            assert cli.poll() is None, "the CLI ended before its temporary server started"
            assert time.monotonic() < deadline, "no temporary Prefect server was started"
            server = _temporary_server(psutil.Process(cli.pid))
            time.sleep(0.1)
        # Killed while the server is still migrating its database: the earliest moment it can be orphaned.
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 15
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(server), f"the temporary Prefect server (pid {server.pid}) outlived the killed CLI"
    finally:
        if server is not None and _running(server):
            server.kill()
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_a_prefect_api_that_dies_mid_run_fails_the_cli_within_a_minute_and_says_so(shared_data, tmp_path):
    from tests.helpers import copy_patient_subset, free_port, wait_for_port

    source = copy_patient_subset(shared_data, tmp_path / "subset", per_class=40)
    port = free_port()
    home = {"PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **home}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home")}
    cli = None
    try:
        wait_for_port(port, timeout=240)
        # Long training: the API dies while a task computes and has nothing to tell it.
        cli = subprocess.Popen(
            [sys.executable, "flows/full.py", "--source", str(source), "--workdir", str(tmp_path / "work"),
             "--run.runner", "threads", "--run.workers", "1", "--epochs", "100000", "--train.patience", "100000"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        output = []
        for line in cli.stdout:
            output.append(line)
            if "epoch 50/" in line:
                break
        else:
            raise AssertionError("training never started:\n" + "".join(output))
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = cli.communicate(timeout=300)
        seconds = time.monotonic() - killed
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 1
    assert seconds < 90, f"the CLI took {seconds:.0f} s to give up on a dead Prefect API"
    assert f"the Prefect API at {api} went away" in rest
    assert "re-run the same command" in rest and "cached" in rest
