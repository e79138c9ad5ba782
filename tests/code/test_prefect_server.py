"""The local Prefect server that stays (flows/prefect_server.py, `pneumo server ...`), and Ctrl-C of `pneumo run`.

Real processes: real `prefect server start` servers in a temporary PNEUMO_SERVER_DIR, real CLI
runs, real signals. Every server a test starts is stopped by it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cli import server as prefect_server
from tests.helpers import copy_patient_subset, free_port, pneumo_command, wait_for_port

REPO = Path(__file__).resolve().parents[2]


def local_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user without PREFECT_API_URL: runs use the local server of tmp_path/server."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PNEUMO_PREFECT_SERVER")}
    env.update(PNEUMO_SERVER_DIR=str(tmp_path / "server"), PREFECT_HOME=str(tmp_path / "client-home"),
               PYTHONPATH=str(REPO), **extra)
    return env


def pneumo(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pneumo_command(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)


def record(env: dict[str, str]) -> dict:
    return json.loads((Path(env["PNEUMO_SERVER_DIR"]) / "server.json").read_text())


def kill_recorded(env: dict[str, str]) -> None:
    """Teardown: whatever server the folder records is killed, whatever the test did."""
    path = Path(env["PNEUMO_SERVER_DIR"]) / "server.json"
    if path.exists():
        data = json.loads(path.read_text())
        for pid in (data["supervisor_pid"], data["pid"]):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def foreign_server(tmp_path):
    """A process that is not ours, listening on a port: an HTTP server answering 200 to everything."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield process, port
    finally:
        process.kill()
        process.wait()


def test_a_dead_pid_or_a_foreign_process_on_the_recorded_port_is_not_trusted(tmp_path, monkeypatch, foreign_server):
    process, port = foreign_server
    monkeypatch.setenv("PNEUMO_SERVER_DIR", str(tmp_path / "server"))
    (tmp_path / "server").mkdir()
    foreign = prefect_server.Server(pid=process.pid, create_time=psutil.Process(process.pid).create_time(),
                                    supervisor_pid=process.pid, port=port, started_at="x", idle_minutes=30)
    prefect_server.write_record(foreign)
    assert prefect_server.running() is None
    server, state = prefect_server.check(prefect_server.read_record())
    assert server is None and f"pid {process.pid} is not a Prefect server on port {port}" in state

    # The pid was reused by another process since the record was written.
    prefect_server.write_record(foreign.__class__(**{**foreign.__dict__, "create_time": foreign.create_time - 100}))
    assert "is another process now" in prefect_server.check(prefect_server.read_record())[1]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefect_server.write_record(foreign.__class__(**{**foreign.__dict__, "pid": dead.pid}))
    assert prefect_server.check(prefect_server.read_record())[1] == f"not running (stale record: pid {dead.pid} is gone)"
    running, lines = prefect_server.status_lines()
    assert not running and str(tmp_path / "server" / "prefect-home" / "prefect.db") in "\n".join(lines)


@pytest.mark.slow
def test_two_starts_at_once_share_one_server_that_stops_on_request_and_when_idle(tmp_path, foreign_server):
    foreign, taken_port = foreign_server
    # A stale record names the foreign process on the preferred port: neither may be used.
    env = local_env(tmp_path, PNEUMO_SERVER_PORT=str(taken_port))
    Path(env["PNEUMO_SERVER_DIR"]).mkdir()
    (Path(env["PNEUMO_SERVER_DIR"]) / "server.json").write_text(json.dumps(
        {"pid": foreign.pid, "create_time": psutil.Process(foreign.pid).create_time(), "supervisor_pid": foreign.pid,
         "port": taken_port, "started_at": "x", "idle_minutes": 30}))
    try:
        assert pneumo(env, "server", "status").returncode == 1
        starts = [subprocess.Popen(pneumo_command("server", "start"), env=env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = sorted(start.communicate(timeout=400)[0] for start in starts)
        assert [start.returncode for start in starts] == [0, 0], outputs
        assert "already running" in outputs[0] and " started: UI " in outputs[1], outputs
        server = record(env)
        assert server["port"] != taken_port and server["pid"] != foreign.pid
        assert all(f"pid {server['pid']}" in output for output in outputs), outputs  # one server for both
        with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/api/health", timeout=5) as response:
            assert response.status == 200

        status = pneumo(env, "server", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"UI          http://127.0.0.1:{server['port']}" in status.stdout and "running" in status.stdout
        print(status.stdout)

        stopped = pneumo(env, "server", "stop")
        assert f"stopped the local Prefect server (pid {server['pid']}" in stopped.stdout
        assert gone(server["pid"]) and gone(server["supervisor_pid"])
        assert pneumo(env, "server", "status").returncode == 1
        assert foreign.poll() is None  # the foreign process was left alone

        # Idle stop: 0.05 min (3 s), checked every second; held in use, it stays.
        idle_env = {**env, "PNEUMO_SERVER_IDLE_MINUTES": "0.05", "PNEUMO_SERVER_CHECK_SECONDS": "1"}
        assert pneumo(idle_env, "server", "start").returncode == 0
        server = record(env)
        user = subprocess.Popen(  # a run using it: the shared in-use lock, for 8 s
            [sys.executable, "-c", "import time; from cli import server as prefect_server\n"
             "with prefect_server.in_use():\n    time.sleep(8)"], env=env, cwd=REPO)
        time.sleep(6)
        assert not gone(server["pid"]), "the server stopped while a run was using it"
        user.wait(timeout=60)
        wait_until(lambda: gone(server["pid"]), 40, "the idle server stopped itself")
        wait_until(lambda: gone(server["supervisor_pid"]), 30, "its supervisor ended")
        assert "stopped (idle for 0.05 min)" in (Path(env["PNEUMO_SERVER_DIR"]) / "server.log").read_text()
        assert not (Path(env["PNEUMO_SERVER_DIR"]) / "server.json").exists()
    finally:
        kill_recorded(env)


def descendants_in_session(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.slow
def test_runs_reuse_the_local_server_whose_links_work_after_the_run_and_ctrl_c_says_resume(shared_data, tmp_path):
    source = copy_patient_subset(shared_data, tmp_path / "subset", per_class=40)
    env = local_env(tmp_path, PNEUMO_SERVER_PORT=str(free_port()))
    run = [sys.executable, "flows/full.py", "--source", str(source), "--workdir", str(tmp_path / "work"),
           "--epochs", "100000", "--train.patience", "100000"]
    try:
        # 1. The first run starts the server, says so, and is Ctrl-C'ed (as a terminal does: the whole group) in training.
        cli = subprocess.Popen(run, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        output = []
        for line in cli.stdout:
            output.append(line)
            if "epoch 50/" in line:
                break
        else:
            raise AssertionError("training never started:\n" + "".join(output))
        os.killpg(cli.pid, signal.SIGINT)
        interrupted = time.monotonic()
        rest, _ = cli.communicate(timeout=60)
        seconds = time.monotonic() - interrupted
        text = "".join(output)
        print(f"Ctrl-C: exit {cli.returncode} after {seconds:.2f} s; last output:\n{rest}")
        assert "pneumo: started the local Prefect server in the background: UI http://127.0.0.1:" in text
        assert cli.returncode == 130
        assert seconds < 3, f"{seconds:.1f} s from SIGINT to exit"
        assert rest.strip() == "pneumo: interrupted: 4 of 5 stages are cached; re-run the same command to resume"
        assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
        wait_until(lambda: not descendants_in_session(cli.pid), 5, "the CLI's workers stopped")
        server = record(env)
        assert not gone(server["pid"]), "Ctrl-C stopped the local server"

        # 2. The same command resumes from the cache; two Ctrl-Cs in a row end it at once.
        cli = subprocess.Popen(run, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        output = []
        for line in cli.stdout:
            output.append(line)
            if "epoch 50/" in line:
                break
        text = "".join(output)
        assert "pneumo: using the local Prefect server: UI http://127.0.0.1:" in text
        assert text.count("Finished in state Cached") >= 4, text  # download, sizes, shard(s), index, quarantine
        os.killpg(cli.pid, signal.SIGINT)
        os.killpg(cli.pid, signal.SIGINT)
        rest, _ = cli.communicate(timeout=60)
        assert cli.returncode == 130 and "Traceback" not in rest

        # 3. A run to the end: its last line is its UI page, and the page and its API answer after the run.
        finished = subprocess.run([*run[:-4], "--epochs", "3"], env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=600)
        assert finished.returncode == 0, finished.stdout + finished.stderr
        last = finished.stdout.strip().splitlines()[-1]
        assert last.startswith(f"  run page     http://127.0.0.1:{server['port']}/runs/flow-run/"), last
        flow_run_id = last.rsplit("/", 1)[1]
        view_at = f"View at http://127.0.0.1:{server['port']}/runs/flow-run/{flow_run_id}"
        assert view_at in finished.stdout + finished.stderr
        browser = urllib.request.Request(last.split()[-1], headers={"Accept": "text/html"})  # the UI answers browsers
        with urllib.request.urlopen(browser, timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/api/flow_runs/{flow_run_id}", timeout=10) as api:
            assert json.loads(api.read())["state"]["type"] == "COMPLETED"
        # The UI asks its API on this port, not on Prefect's default 4200.
        with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/ui-settings", timeout=10) as settings:
            assert json.loads(settings.read())["api_url"] == f"http://127.0.0.1:{server['port']}/api"
    finally:
        stopped = pneumo(env, "server", "stop")
        print(stopped.stdout, stopped.stderr)
        kill_recorded(env)
