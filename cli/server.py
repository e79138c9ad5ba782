"""The local Prefect server: Prefect's own ``prefect server start``, detached, in a per-user folder.

Everything is in ``state_dir()`` (``$PNEUMO_SERVER_DIR``, else ``${XDG_STATE_HOME:-~/.local/state}/pneumo/server``,
mode 0700, so no other local user can read or lock it):

    prefect-home/          the server's PREFECT_HOME: prefect.db, and server.pid (as `prefect server start --background` writes it)
    server.json            port, pid and start time of the server pneumo started
    server.log             the server's output
    start.lock             held while a server is checked, started or stopped (two runs at once start one)

A new PREFECT_HOME starts from a copy of an empty database already migrated for this Prefect version
(``${XDG_CACHE_HOME:-~/.cache}/pneumo/prefect-<version>.db``, made once): the migrations are half of a first start.

A server is used only when the process holding the LISTEN socket on its port is the one Prefect started there
(pid, start time, command line, PREFECT_HOME), never a process that merely answers /api/health. No Prefect import.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import psutil

from pneumo import locks

HOST = "127.0.0.1"
DEFAULT_PORT = 4280  # not 4200: `make stack-up`'s Prefect server (infra/stack.sh) has that one
START_TIMEOUT_SECONDS = 150.0  # a fresh SQLite database needs ~20 s of migrations on a busy machine
COMMAND = ["-m", "prefect", "server", "start", "--host", HOST, "--port"]  # the server's command line, then its port


@dataclass(frozen=True)
class Server:
    """The server pneumo started, as server.json records it."""

    pid: int
    create_time: float
    port: int
    started_at: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


class PortTaken(RuntimeError):
    """Another process bound the port between pneumo's choice and the server's start."""


def state_dir() -> Path:
    configured = os.environ.get("PNEUMO_SERVER_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser().resolve() / "pneumo" / "server"


def prefect_home() -> Path:
    return state_dir() / "prefect-home"


def log_path() -> Path:
    return state_dir() / "server.log"


def private_dir() -> Path:
    """state_dir(), created 0700 (and tightened if an older pneumo made it 0755)."""
    folder = state_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


STOP_LOCK_WAIT = 5.0  # a stop never hangs on a lock held by another pneumo (or another user): it says so and ends


def start_lock(wait: float = START_TIMEOUT_SECONDS + 30) -> contextlib.AbstractContextManager:
    """Hold start.lock (0600; flock, freed however its holder dies), waiting at most ``wait`` s and saying for what."""
    return locks.held(private_dir() / "start.lock", "another pneumo is starting or stopping the local Prefect server",
                      wait, say=lambda text: print(f"pneumo: {text}", file=sys.stderr, flush=True))


def read_record() -> Optional[Server]:
    try:
        return Server(**json.loads((state_dir() / "server.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(server: Server) -> None:
    temporary = state_dir() / "server.json.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(asdict(server), handle, indent=2)
    temporary.replace(state_dir() / "server.json")


def prefect_pid() -> Optional[int]:
    """The pid in PREFECT_HOME/server.pid (where `prefect server start --background` and `stop` keep it)."""
    try:
        return int((prefect_home() / "server.pid").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- is it ours


def is_our_server_process(pid: int) -> bool:
    """True when ``pid`` is a `prefect server start` whose PREFECT_HOME is this folder's."""
    try:
        process = psutil.Process(pid)
        return process.cmdline()[1:8] == COMMAND and process.environ().get("PREFECT_HOME") == str(prefect_home())
    except psutil.Error:
        return False


def why_not_ours(server: Server) -> Optional[str]:
    """None when the recorded pid is the server this folder started on its port; otherwise why it is not."""
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
    if command[8:9] != [str(server.port)] or not is_our_server_process(server.pid):
        return f"pid {server.pid} is not a Prefect server on port {server.port} of {state_dir()}: {' '.join(command)[:120]}"
    return None


def listens(server: Server) -> bool:
    """True when the server's process (or one of its workers) holds the LISTEN socket on its port."""
    try:
        process = psutil.Process(server.pid)
        return any(
            connection.status == psutil.CONN_LISTEN and connection.laddr.port == server.port
            for member in (process, *process.children(recursive=True))
            for connection in member.net_connections(kind="tcp")
        )
    except psutil.Error:
        return False


def listener(port: int) -> Optional[str]:
    """Who listens on ``port`` ("pid N: command", or "a process of another user"), or None."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            if connection.pid is None:
                return "a process of another user"
            with contextlib.suppress(psutil.Error):
                return f"pid {connection.pid}: {' '.join(psutil.Process(connection.pid).cmdline())[:80]}"
            return f"pid {connection.pid}"
    return None


def answers(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check(server: Optional[Server], timeout: float = 2.0) -> tuple[Optional[Server], str]:
    """(server, "running") when the record names our live server, owning its port and answering; else (None, why not)."""
    if server is None:
        return None, "not running"
    problem = why_not_ours(server)
    if problem:
        return None, f"not running (stale record: {problem})"
    if not listens(server):
        return None, f"not listening on {server.url} (pid {server.pid}: still starting, or the port is {listener(server.port)})"
    if not answers(server.api_url, timeout):
        return None, f"not answering on {server.url} (pid {server.pid}: still starting, or hung)"
    return server, "running"


def running(timeout: float = 2.0) -> Optional[Server]:
    return check(read_record(), timeout)[0]


# --------------------------------------------------------------------------- start and stop


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_port() -> int:
    """PNEUMO_SERVER_PORT (default 4280) when free, else any free port."""
    value = os.environ.get("PNEUMO_SERVER_PORT", "")
    if value and not value.isdigit():
        raise ValueError(f"PNEUMO_SERVER_PORT must be a port number, got {value!r}")
    if port_is_free(int(value or DEFAULT_PORT)):
        return int(value or DEFAULT_PORT)
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def server_environment(port: int) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment.update(
        PREFECT_HOME=str(prefect_home()), DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"http://{HOST}:{port}/api",  # the UI asks its API here, not on Prefect's default 4200
    )
    return environment


def terminate(pid: int, grace: float = 20.0) -> None:
    """SIGTERM ``pid``, SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(grace)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(5)


def clear_stale() -> None:
    """A hung or stray server of this folder stopped; the files of a dead one removed (Prefect refuses to start beside its pid file)."""
    for pid in {getattr(read_record(), "pid", None), prefect_pid()} - {None}:
        if is_our_server_process(pid):
            terminate(pid)
    (state_dir() / "server.json").unlink(missing_ok=True)
    (prefect_home() / "server.pid").unlink(missing_ok=True)


def migrated_database() -> Path:
    """An empty Prefect database with this Prefect version's migrations applied (``prefect server database upgrade``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pneumo"
    database = cache / f"prefect-{importlib.metadata.version('prefect')}.db"
    if not database.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as home:
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], check=True,
                           env={**os.environ, "PREFECT_HOME": home, "DO_NOT_TRACK": "1"}, capture_output=True, timeout=600)
            with contextlib.closing(sqlite3.connect(Path(home) / "prefect.db")) as made, \
                    contextlib.closing(sqlite3.connect(Path(home) / "copy.db")) as copy:
                made.backup(copy)  # one file, whatever the upgrade left in its write-ahead log
            os.replace(Path(home) / "copy.db", database)  # whole or absent, even with two starts at once
    return database


def seed_home(home: Path) -> None:
    """A new PREFECT_HOME gets a copy of ``migrated_database()`` (infra/stack.sh calls this too)."""
    if not (home / "prefect.db").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # a cache: without it the server migrates
            shutil.copyfile(migrated_database(), home / "copy.db")
            os.replace(home / "copy.db", home / "prefect.db")  # never a half copy


def start_on(port: int, timeout: float = START_TIMEOUT_SECONDS) -> Server:
    """`prefect server start` on ``port``, detached; the server once its own process listens there and answers.

    Not `--background`, whose server dies at its first logged error (its pipes unread once the command
    exits). Output goes to server.log; the pid file is written as `--background` writes it, for `prefect server stop`.
    """
    prefect_home().mkdir(mode=0o700, exist_ok=True)
    seed_home(prefect_home())
    with open(os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as log:
        log.write(f"\n--- {now()} prefect server start on {HOST}:{port}\n")
        log.flush()
        process = subprocess.Popen(  # its own session: a Ctrl-C at the terminal does not reach the server
            [sys.executable, *COMMAND, str(port)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=server_environment(port), start_new_session=True,
        )
    (prefect_home() / "server.pid").write_text(str(process.pid))
    server = Server(process.pid, psutil.Process(process.pid).create_time(), port, now())
    write_record(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if listens(server) and answers(server.api_url, timeout=1.0):
            return server
        time.sleep(0.3)
    clear_stale()
    holder = listener(port)
    if holder:  # the server could not bind: someone took the port after our choice
        raise PortTaken(f"port {port} was taken by another process ({holder}) before the Prefect server could bind it")
    raise RuntimeError(f"the local Prefect server did not start on port {port} within {timeout:.0f} s; "
                       f"{log_path()} says why")


def ensure_running() -> tuple[Server, bool]:
    """The running server, started now if none is up: (server, started_now)."""
    with start_lock():
        server, state = check(read_record(), timeout=15.0)  # a busy server is slow, not gone: not replaced for that
        if server is not None:
            return server, False
        with open(log_path(), "a") as log:
            log.write(f"\n--- {now()} pid {os.getpid()} found the server {state}\n")
        clear_stale()
        try:
            return start_on(choose_port()), True
        except PortTaken as taken:  # never used: a second try on a port chosen again
            port = choose_port()
            print(f"pneumo: {taken}; not using it, starting on port {port}", file=sys.stderr, flush=True)
            return start_on(port), True


def stop() -> Optional[Server]:
    """Stop the local server if it is ours (`prefect server stop` would SIGTERM whatever pid its file names): it, or None."""
    with start_lock(STOP_LOCK_WAIT):
        server = read_record()
        ours = server is not None and why_not_ours(server) is None
        if ours:
            terminate(server.pid)
        clear_stale()
        return server if ours else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def status_lines() -> tuple[bool, list[str]]:
    """(running, the lines `pneumo server status` prints)."""
    server, state = check(read_record())
    lines = [f"local Prefect server: {state}"]
    if server is not None:
        lines += [f"  UI          {server.url}",
                  f"  API         {server.api_url}   (PREFECT_API_URL for other tools)",
                  f"  pid         {server.pid}, since {server.started_at}"]
    return server is not None, lines + [f"  folder      {state_dir()}",
                                        f"  database    {prefect_home() / 'prefect.db'}",
                                        f"  log         {log_path()}"]
