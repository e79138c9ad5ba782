"""The local Prefect server (cli/server.py): Prefect's own background server in a per-user folder, used only
when the process holding its port is the one Prefect started there.

Real processes: real `prefect server start` servers in a temporary PNEUMO_SERVER_DIR, real
squatters. Every server a test starts is stopped by it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from cli import server
from tests.helpers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]


def local_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user without PREFECT_API_URL: the local server of tmp_path/server."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PNEUMO_SERVER_DIR=str(tmp_path / "server"), PREFECT_HOME=str(tmp_path / "client-home"),
               PYTHONPATH=str(REPO), **extra)
    return env


def server_command(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "server", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def record(env: dict[str, str]) -> dict:
    return json.loads((Path(env["PNEUMO_SERVER_DIR"]) / "server.json").read_text())


def kill_servers_of(folder: Path) -> None:
    """Teardown: every Prefect server of ``folder`` is killed, whatever the test did."""
    home = str(folder.resolve() / "prefect-home")
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.cmdline()[1:8] == server.COMMAND and process.environ().get("PREFECT_HOME") == home:
                process.kill()


def start_foreign_http_server(folder: Path, port: int) -> subprocess.Popen:
    """Not ours: an HTTP server answering 200 on /api/health, as a Prefect server would."""
    (folder / "api" / "health").mkdir(parents=True, exist_ok=True)
    (folder / "api" / "health" / "index.html").write_text("true")
    return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=open(folder / "requests.log", "w"))


@pytest.fixture
def foreign_server(tmp_path):
    port = free_port()
    process = start_foreign_http_server(tmp_path / "foreign", port)
    try:
        wait_for_port(port)
        yield process, port
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow  # foreign processes: in `make test`, not `make test-fast`
def test_a_dead_pid_or_a_foreign_process_is_neither_trusted_nor_signalled(tmp_path, monkeypatch, foreign_server, capsys):
    process, port = foreign_server
    monkeypatch.setenv("PNEUMO_SERVER_DIR", str(tmp_path / "server"))
    server.private_dir()
    foreign = server.Server(pid=process.pid, create_time=psutil.Process(process.pid).create_time(), port=port,
                            started_at="x")
    server.write_record(foreign)
    assert server.answers(f"http://127.0.0.1:{port}/api")  # it answers /api/health: that is not enough
    assert server.running() is None
    assert f"pid {process.pid} is not a Prefect server on port {port}" in server.check(server.read_record())[1]

    # Issue 23 item 12: stop signals only its own server, even when Prefect's own pid file names the process too.
    server.prefect_home().mkdir()
    (server.prefect_home() / "server.pid").write_text(str(process.pid))
    assert server.stop() is None and process.poll() is None
    assert not (tmp_path / "server" / "server.json").exists() and server.prefect_pid() is None

    # The pid was reused by another process since the record was written.
    server.write_record(dataclasses.replace(foreign, create_time=foreign.create_time - 100))
    assert "is another process now" in server.check(server.read_record())[1]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    server.write_record(dataclasses.replace(foreign, pid=dead.pid))
    assert server.check(server.read_record())[1] == f"not running (stale record: pid {dead.pid} is gone)"
    running, lines = server.status_lines()
    assert not running and str(tmp_path / "server" / "prefect-home" / "prefect.db") in "\n".join(lines)

    # Issue 23 item 13: the folder is 0700 and its files 0600; a held lock is waited for, boundedly and out loud.
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "server") == 0o700 and mode(tmp_path / "server" / "server.json") == 0o600
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "handle = open(sys.argv[1]); fcntl.flock(handle, fcntl.LOCK_SH); print(1, flush=True)\n"
                               "time.sleep(60)", str(tmp_path / "server" / "start.lock")], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        with pytest.raises(RuntimeError, match="start.lock is still held after 1 s"):
            with server.start_lock(wait=1):
                pass
    finally:
        holder.kill()
    assert f"waiting for {tmp_path / 'server' / 'start.lock'}" in capsys.readouterr().err
    assert mode(tmp_path / "server" / "start.lock") == 0o600


def test_a_record_naming_another_folders_prefect_server_is_never_signalled(tmp_path, monkeypatch):
    """Issue 23 item 12: `server stop` signalled a process it only guessed was its own (on 9f514c2: any process
    whose arguments held "supervise"). A process with the server's very command line, start time and port in
    server.json and in Prefect's pid file, but another PREFECT_HOME (another folder's or user's server), is left alone."""
    fake = tmp_path / "fake"  # `python -m prefect server start ...` runs this package: the same command line, no server
    (fake / "prefect").mkdir(parents=True)
    (fake / "prefect" / "__init__.py").write_text("")  # a regular package: found before the installed one
    (fake / "prefect" / "__main__.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    port = free_port()
    other = subprocess.Popen([sys.executable, *server.COMMAND, str(port)], cwd=fake, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PREFECT_HOME": str(tmp_path / "another-folder" / "prefect-home")})
    try:
        assert other.stdout.readline() == "up\n"
        assert psutil.Process(other.pid).cmdline()[1:9] == [*server.COMMAND, str(port)]
        monkeypatch.setenv("PNEUMO_SERVER_DIR", str(tmp_path / "server"))
        server.private_dir()
        server.prefect_home().mkdir()
        (server.prefect_home() / "server.pid").write_text(str(other.pid))
        server.write_record(server.Server(other.pid, psutil.Process(other.pid).create_time(), port, "x"))
        assert "is not a Prefect server on port" in server.check(server.read_record())[1]
        assert server.stop() is None
        assert other.poll() is None and not gone(other.pid)  # never signalled
    finally:
        other.kill()
        other.wait()


HOLD_THE_LOCK = """import fcntl, sys, time
handle = open(sys.argv[1])  # read-only is enough for a shared flock
fcntl.flock(handle, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_server_stop_with_its_lock_held_by_another_process_says_so_and_ends(tmp_path):
    """Issue 23 item 13: a process holding start.lock made `pneumo server stop` hang in silence (on main: 180 s
    without a word; before the shell change, forever). Now: a line after a second, a clear error after 5 s."""
    env = local_env(tmp_path)
    folder = Path(env["PNEUMO_SERVER_DIR"])
    folder.mkdir(mode=0o755)  # as an older pneumo left them: 0755 and 0644
    lock = folder / "start.lock"
    lock.touch(mode=0o644)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        stopped = server_command(env, "stop", timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert stopped.returncode == 1 and stopped.stdout == "", stopped.stdout + stopped.stderr
    assert stopped.stderr.splitlines() == [
        f"pneumo: waiting for {lock}: another pneumo is starting or stopping the local Prefect server (at most 5 s)",
        f"pneumo: {lock} is still held after 5 s (another pneumo is starting or stopping the local Prefect server); "
        f"`fuser -v {lock}` names the holder",
    ]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(lock.stat().st_mode) == 0o600


@pytest.mark.slow
def test_two_starts_at_once_share_one_server_that_stops_on_request(tmp_path, foreign_server):
    foreign, taken_port = foreign_server
    # A stale record names the foreign process on the preferred port: neither may be used.
    env = local_env(tmp_path, PNEUMO_SERVER_PORT=str(taken_port))
    Path(env["PNEUMO_SERVER_DIR"]).mkdir()
    (Path(env["PNEUMO_SERVER_DIR"]) / "server.json").write_text(json.dumps(
        {"pid": foreign.pid, "create_time": psutil.Process(foreign.pid).create_time(), "port": taken_port,
         "started_at": "x"}))
    try:
        assert server_command(env, "status").returncode == 1
        starts = [subprocess.Popen([sys.executable, "-m", "cli", "server", "start"], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = sorted((start.communicate(timeout=400)[0] for start in starts), key=lambda out: "already" in out)
        assert [start.returncode for start in starts] == [0, 0], outputs
        assert " started: UI " in outputs[0] and "already running" in outputs[1], outputs
        assert "waiting for" in outputs[1]  # the second start said what it waited for
        assert "usage data" not in "".join(outputs)
        running = record(env)
        assert running["port"] != taken_port and running["pid"] != foreign.pid
        assert all(f"pid {running['pid']}" in output for output in outputs), outputs  # one server for both
        with urllib.request.urlopen(f"http://127.0.0.1:{running['port']}/api/health", timeout=5) as response:
            assert response.status == 200
        environment = psutil.Process(running["pid"]).environ()  # telemetry off in the server itself
        assert environment["DO_NOT_TRACK"] == "1" and environment["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "false"

        status = server_command(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"UI          http://127.0.0.1:{running['port']}" in status.stdout and ": running" in status.stdout

        stopped = server_command(env, "stop")
        assert f"stopped the local Prefect server (pid {running['pid']}" in stopped.stdout
        assert gone(running["pid"])
        assert server_command(env, "status").returncode == 1
        assert foreign.poll() is None  # the foreign process was left alone
    finally:
        kill_servers_of(Path(env["PNEUMO_SERVER_DIR"]))


@pytest.mark.slow  # a real server start
def test_a_new_server_home_starts_from_the_migrated_database_made_once(tmp_path):
    """Half of a first start was Prefect's migrations of an empty database: a new home copies one migrated once."""
    env = local_env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    made = subprocess.run([sys.executable, "-c", "from cli import server; print(server.migrated_database())"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    template = Path(made.stdout.strip())
    assert template.parent == tmp_path / "cache" / "pneumo" and template.name.startswith("prefect-3.")
    with contextlib.closing(sqlite3.connect(template)) as database:
        assert database.execute("SELECT version_num FROM alembic_version").fetchone()  # migrated
        assert database.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)  # and empty
        database.execute("CREATE TABLE pneumo_marker (x)")  # tells the copy from a database the server made itself
        database.commit()
    try:
        started = server_command(env, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        with contextlib.closing(sqlite3.connect(tmp_path / "server" / "prefect-home" / "prefect.db")) as database:
            tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "pneumo_marker" in tables and "flow_run" in tables
        with urllib.request.urlopen(f"http://127.0.0.1:{record(env)['port']}/api/health", timeout=5) as response:
            assert response.status == 200
    finally:
        kill_servers_of(tmp_path / "server")


# A run through cli.runtime whose first port is squatted in one of the two windows of a start: between
# pneumo's choice and `prefect server start`'s own check of the port (choose_port), or between that check
# (its banner printed) and the moment the server binds, seconds later (listens, polled meanwhile).
SQUATTED_RUN = """
import sys, time
from pathlib import Path
from cli import runtime, server
runtime.quiet_prefect()
from prefect import flow

folder, port, window = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
original = getattr(server, window)

def squat() -> None:
    sys.path.insert(0, sys.argv[3])
    from test_prefect_server import start_foreign_http_server
    squatter = start_foreign_http_server(folder, port)
    (folder / "squatter.pid").write_text(str(squatter.pid))
    deadline = time.monotonic() + 20
    while server.listener(port) is None and time.monotonic() < deadline:
        time.sleep(0.05)

def first_choice():
    server.choose_port = original
    squat()
    return port

def listens_after_the_banner(running):
    if "Check out the dashboard" not in server.log_path().read_text():
        return False
    server.listens = original
    squat()
    return original(running)

if window == "choose_port":
    server.choose_port = first_choice
else:
    choose = server.choose_port
    def first_port():
        server.choose_port = choose
        return port
    server.choose_port, server.listens = first_port, listens_after_the_banner

@flow
def hello() -> int:
    return 42

sys.exit(runtime.run_flow(hello, {}, lambda result, seconds: print(f"result {result}")))
"""


@pytest.mark.slow
@pytest.mark.parametrize("window", ["choose_port", "listens"])
def test_a_squatter_that_takes_the_port_before_the_server_binds_it_never_receives_a_run(tmp_path, window):
    """Issue 23 item 1: on main the squatter answered /api/health, was taken for the server, and got the run
    (main, same squatter in the second window: "started the local Prefect server", then GET /api/admin/version to it)."""
    squatted = free_port()
    env = local_env(tmp_path)
    script = tmp_path / "squatted_run.py"
    script.write_text(SQUATTED_RUN)
    try:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "squatter"), str(squatted),
                              str(Path(__file__).parent), window], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
        print(out.stdout, out.stderr)
        running = record(env)
    finally:
        pid_file = tmp_path / "squatter" / "squatter.pid"
        if pid_file.exists():
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(pid_file.read_text())).kill()
        kill_servers_of(tmp_path / "server")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"pneumo: port {squatted} was taken by another process (pid " in out.stderr
    assert f"not using it, starting on port {running['port']}" in out.stderr
    assert running["port"] != squatted and "result 42" in out.stdout
    assert f"run page     http://127.0.0.1:{running['port']}/runs/flow-run/" in out.stdout
    requests = (tmp_path / "squatter" / "requests.log").read_text()
    assert "HTTP/1.1" not in requests, requests  # not a request reached it (on main: /api/health, then the run)
    assert "usage data" not in out.stderr
