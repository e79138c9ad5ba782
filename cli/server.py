"""The project's local Prefect server: started in the background once, shared by every run, stopped when idle.

Everything about it is in one folder, ``state_dir()``: ``$PNEUMO_SERVER_DIR``, by default
``${XDG_STATE_HOME:-~/.local/state}/pneumo/server`` (state that outlives a run but is not
user data; per user, so every clone and workdir shows its runs in one UI):

    prefect-home/prefect.db   the server's SQLite database (its PREFECT_HOME)
    server.json               pid, process start time, port and idle limit of the running server
    server.log                the server's output, and why it stopped
    start.lock                held while a server is checked or started or stopped (two runs at once start one)
    in-use.lock               held (shared) by every run that uses the server: while held, it is busy
    last-used                 touched when a run starts and ends

``python -m prefect server start`` runs under a small supervisor (``python -m flows.prefect_server
supervise``) in its own session, so a Ctrl-C at the terminal does not reach it. Every 10 s the
supervisor checks whether the server is in use; after ``idle_minutes`` without a run it stops the
server and itself. A recorded server is trusted only if its pid is alive, is the process that was
recorded (same start time, a ``prefect server start`` command line on the recorded port) and
answers ``/api/health`` there: a dead process or a foreign one on the port is never used.

This module imports no Prefect: ``pneumo server status`` answers in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import psutil

HOST = "127.0.0.1"
DEFAULT_PORT = 4280  # not 4200: `make stack-up`'s Prefect server (infra/stack.sh) has that one
DEFAULT_IDLE_MINUTES = 30.0
START_TIMEOUT_SECONDS = 120.0  # a fresh SQLite database needs ~20 s of migrations on a busy machine
CHECK_EVERY_SECONDS = 10.0
# Flow runs of deployments (run by a worker against this server) keep it busy while not final.
# Runs started from a shell hold in-use.lock instead, which their end releases even on kill -9.
BUSY_STATES = ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]


def state_dir() -> Path:
    """The one folder of the local server: database, record, log and locks."""
    configured = os.environ.get("PNEUMO_SERVER_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser().resolve() / "pneumo" / "server"


def idle_minutes() -> float:
    """Minutes without a run after which the server stops (``PNEUMO_SERVER_IDLE_MINUTES``, default 30)."""
    value = os.environ.get("PNEUMO_SERVER_IDLE_MINUTES", "")
    try:
        minutes = float(value) if value else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ValueError(f"PNEUMO_SERVER_IDLE_MINUTES must be a number of minutes, got {value!r}") from None
    if minutes <= 0:
        raise ValueError(f"PNEUMO_SERVER_IDLE_MINUTES must be above 0, got {value!r}")
    return minutes


def preferred_port() -> int:
    value = os.environ.get("PNEUMO_SERVER_PORT", "")
    if value and not value.isdigit():
        raise ValueError(f"PNEUMO_SERVER_PORT must be a port number, got {value!r}")
    return int(value) if value else DEFAULT_PORT


@dataclass(frozen=True)
class Server:
    """A running server as server.json records it."""

    pid: int
    create_time: float
    supervisor_pid: int
    port: int
    started_at: str
    idle_minutes: float

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


# --------------------------------------------------------------------------- files and locks


def record_path() -> Path:
    return state_dir() / "server.json"


def log_path() -> Path:
    return state_dir() / "server.log"


def read_record() -> Optional[Server]:
    try:
        return Server(**json.loads(record_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(server: Server) -> None:
    temporary = record_path().with_suffix(".tmp")
    temporary.write_text(json.dumps(server.__dict__, indent=2))
    temporary.replace(record_path())


@contextlib.contextmanager
def locked(name: str, mode: int = fcntl.LOCK_EX) -> Iterator[bool]:
    """Hold ``state_dir()/name`` with flock ``mode``; yields False when a non-blocking ``mode`` could not get it.

    flock is released by the kernel when its holder dies, however it dies: no stale lock files.
    """
    state_dir().mkdir(parents=True, exist_ok=True)
    with open(state_dir() / name, "a+") as handle:
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def touch_last_used() -> None:
    (state_dir() / "last-used").touch()  # sets its mtime to now


def last_used() -> float:
    try:
        return (state_dir() / "last-used").stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- is it ours, does it answer


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers ``/health`` at ``url`` (an .../api URL)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_our_process(server: Server) -> Optional[str]:
    """None when the recorded pid is the server this folder started; otherwise why it is not."""
    try:
        process = psutil.Process(server.pid)
        if abs(process.create_time() - server.create_time) > 1.0:
            return f"pid {server.pid} is another process now (the server it recorded is gone)"
        if process.status() == psutil.STATUS_ZOMBIE:
            return f"pid {server.pid} has exited"
        command = process.cmdline()
    except psutil.NoSuchProcess:
        return f"pid {server.pid} is gone"
    except psutil.AccessDenied:
        return f"pid {server.pid} belongs to another user"
    if not ("prefect" in " ".join(command) and "server" in command and "start" in command and str(server.port) in command):
        return f"pid {server.pid} is not a Prefect server on port {server.port}: {' '.join(command)[:120]}"
    return None


def check(server: Optional[Server]) -> tuple[Optional[Server], str]:
    """(the server, "running") when the record names our live server answering on its port; else (None, why not)."""
    if server is None:
        return None, "not running"
    problem = is_our_process(server)
    if problem:
        return None, f"not running (stale record: {problem})"
    if not answers(server.api_url):
        return None, f"not answering on {server.url} (pid {server.pid}; still starting, or hung: see {log_path()})"
    return server, "running"


def running() -> Optional[Server]:
    return check(read_record())[0]


# --------------------------------------------------------------------------- start and stop


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_port() -> int:
    """The preferred port (PNEUMO_SERVER_PORT, 4280) when free, else any free one."""
    port = preferred_port()
    if port_is_free(port):
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def log_tail(lines: int = 15) -> str:
    try:
        return "\n".join(log_path().read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_locked(timeout: float = START_TIMEOUT_SECONDS) -> Server:
    """Start a server (the caller holds start.lock and found none running); return it once it answers."""
    stale = read_record()
    if stale is not None and is_our_process(stale) is None:  # ours but not answering: hung, replace it
        stop_process(stale.pid)
    record_path().unlink(missing_ok=True)
    port = choose_port()
    with open(log_path(), "a") as log:
        log.write(f"\n--- {now()} starting a Prefect server on {HOST}:{port}\n")
        log.flush()
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "cli.server", "supervise", "--port", str(port),
             "--idle-minutes", str(idle_minutes())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,  # no Ctrl-C from the terminal
            cwd=Path(__file__).resolve().parents[1], env=supervisor_environment(),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise RuntimeError(f"the local Prefect server did not start (exit {supervisor.returncode}); "
                               f"{log_path()} ends with:\n{log_tail()}")
        server = read_record()
        if server is not None and server.supervisor_pid == supervisor.pid and answers(server.api_url, timeout=1.0):
            touch_last_used()  # the idle clock starts now
            return server
        time.sleep(0.2)
    stop_process(supervisor.pid)
    raise RuntimeError(f"the local Prefect server did not answer within {timeout:.0f} s; "
                       f"{log_path()} ends with:\n{log_tail()}")


def supervisor_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The supervisor runs this file as a module from the repository root, whatever the caller's cwd.
    root = str(Path(__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [environment.get("PYTHONPATH")])])
    return environment


def ensure_running() -> tuple[Server, bool]:
    """The running server, started now if none is up; (server, started_now)."""
    with locked("start.lock"):
        server = running()
        if server is not None:
            return server, False
        return start_locked(), True


@contextlib.contextmanager
def in_use() -> Iterator[tuple[Server, bool]]:
    """(server, started_now): the local server for the duration of a run, started if needed, kept from its idle stop.

    The shared in-use lock is taken before start.lock is released, so an idle stop (which takes
    both) cannot slip between finding the server up and using it.
    """
    state_dir().mkdir(parents=True, exist_ok=True)
    with locked("start.lock"):
        server = running()
        started = server is None
        if started:
            server = start_locked()
        usage = open(state_dir() / "in-use.lock", "a+")
        fcntl.flock(usage, fcntl.LOCK_SH)
    touch_last_used()
    try:
        yield server, started
    finally:
        touch_last_used()
        usage.close()  # releases the shared lock


def stop_process(pid: int, grace: float = 10.0) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``grace`` seconds."""
    try:
        process = psutil.Process(pid)
        process.terminate()
        process.wait(grace)
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
            process.wait(5)
    except psutil.NoSuchProcess:
        pass


def stop() -> Optional[Server]:
    """Stop the local server (and its supervisor); the server that was stopped, or None when none ran."""
    with locked("start.lock"):
        server = read_record()
        if server is None or is_our_process(server) is not None:
            record_path().unlink(missing_ok=True)
            return None
        with contextlib.suppress(psutil.NoSuchProcess):
            if "supervise" in psutil.Process(server.supervisor_pid).cmdline():
                stop_process(server.supervisor_pid, grace=20.0)  # it stops the server first
        stop_process(server.pid)
        record_path().unlink(missing_ok=True)
        return server


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the supervisor


def deployment_runs_busy(api_url: str) -> bool:
    """True when a deployment's flow run is pending, running, cancelling or paused on this server."""
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": BUSY_STATES}}}, "limit": 50}).encode()
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            runs = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return True  # cannot tell: not idle
    return any(run.get("deployment_id") for run in runs)


def server_environment(port: int) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment["PREFECT_HOME"] = str(state_dir() / "prefect-home")
    environment.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The UI asks its API at PREFECT_UI_API_URL, which defaults to port 4200: say where it is.
    environment["PREFECT_UI_API_URL"] = f"http://{HOST}:{port}/api"
    return environment


def die_with_parent() -> None:
    """In the server process (Linux): SIGTERM it when the supervisor dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(port: int, idle: float, every: float = CHECK_EVERY_SECONDS) -> int:
    """Run ``prefect server start`` on ``port``; stop it after ``idle`` minutes without use, or on SIGTERM."""
    server_process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
        stdin=subprocess.DEVNULL, env=server_environment(port), preexec_fn=die_with_parent,
    )
    server = Server(pid=server_process.pid, create_time=psutil.Process(server_process.pid).create_time(),
                    supervisor_pid=os.getpid(), port=port, started_at=now(), idle_minutes=idle)
    write_record(server)
    print(f"{now()} supervisor {os.getpid()}: server pid {server.pid} on {server.url}, stops after {idle:g} min idle",
          flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("pneumo server stop (SIGTERM)"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    last_active, next_check = time.time(), time.monotonic() + every
    while not stopping and server_process.poll() is None:
        time.sleep(0.5)  # short naps: a SIGTERM is acted on at once
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + every
        with locked("in-use.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            pass  # only a test: a run starting meanwhile must not wait for the API call below
        if not free or deployment_runs_busy(server.api_url):
            last_active = time.time()
        last_active = max(last_active, last_used())
        if time.time() - last_active < idle * 60:
            continue
        with locked("start.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as mine:
            # Re-checked under start.lock: a run that has just found the server up already holds in-use.lock.
            with locked("in-use.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
                if mine and free and time.time() - max(last_active, last_used()) >= idle * 60:
                    stopping.append(f"idle for {idle:g} min")
                    stop_process(server.pid, grace=20.0)
                    record_path().unlink(missing_ok=True)
    if server_process.poll() is None:
        stop_process(server.pid, grace=20.0)
    if read_record() == server:
        record_path().unlink(missing_ok=True)
    reason = stopping[0] if stopping else f"the server exited with code {server_process.returncode}"
    print(f"{now()} supervisor {os.getpid()}: stopped ({reason})", flush=True)
    return 0


# --------------------------------------------------------------------------- status


def status_lines() -> tuple[bool, list[str]]:
    """(running, the lines `pneumo server status` prints)."""
    server, state = check(read_record())
    folder = state_dir()
    lines = [f"local Prefect server: {state}"]
    if server is not None:
        idle_for = (time.time() - last_used()) / 60
        with locked("in-use.lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
            use = "a run is using it" if not free else f"last used {idle_for:.0f} min ago"
        lines += [
            f"  UI          {server.url}",
            f"  API         {server.api_url}   (PREFECT_API_URL for other tools)",
            f"  pid         {server.pid} (supervisor {server.supervisor_pid}), since {server.started_at}",
            f"  idle stop   after {server.idle_minutes:g} min without a run; {use}",
        ]
    lines += [
        f"  folder      {folder}",
        f"  database    {folder / 'prefect-home' / 'prefect.db'}",
        f"  log         {log_path()}",
    ]
    return server is not None, lines


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cli.server")
    commands = parser.add_subparsers(dest="command", required=True)
    supervisor = commands.add_parser("supervise", help="run the server and stop it when idle (started by pneumo)")
    supervisor.add_argument("--port", type=int, required=True)
    supervisor.add_argument("--idle-minutes", type=float, required=True)
    supervisor.add_argument("--check-every", type=float,
                            default=float(os.environ.get("PNEUMO_SERVER_CHECK_SECONDS", CHECK_EVERY_SECONDS)))
    args = parser.parse_args(argv)
    return supervise(args.port, args.idle_minutes, args.check_every)


if __name__ == "__main__":
    sys.exit(main())
