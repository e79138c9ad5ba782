"""How a flow runs from the command line: its Prefect API, client retries, a watchdog, and its exit.

- ``prefect_api``: the configured Prefect API, or one temporary local server for the run,
  stopped when this process ends however it ends (its watcher). Server start and stop live here.
- ``bounded_api_retries`` and ``watch_api``: a Prefect API that dies fails the run in
  about a minute, with a message that says so, rather than after many minutes of retries.
- ``run_flow``: `pneumo run` and `python flows/full.py` around a flow call: tracebacks kept
  off the terminal, the one-line failure message and the exit code; ``exit_process`` ends the process.

Importing this module sets Prefect's environment defaults, so import it before Prefect.
Prefect itself is imported only inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

# Before Prefect is imported: a fresh ephemeral API server needs ~18 s of database
# migrations here, close to Prefect's 20 s default; its telemetry only adds noise.
# Both are defaults, so a user's own setting always wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

API_GONE_AFTER_SECONDS = 30.0
CLI_CLIENT_MAX_RETRIES = 2
API_GONE = False  # set by run_flow when the run failed because the Prefect API went away

# --------------------------------------------------------------------------- the Prefect server

# Runs beside the temporary Prefect server: once the process that started both is gone
# (even by SIGKILL, which runs no atexit handler), it stops the server, so no orphaned
# uvicorn keeps ~250 MB and a port. It ends by itself when the server stops first.
SERVER_WATCHER = """
import os, signal, sys, time
owner, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
while os.getppid() == owner and alive(server):
    time.sleep(0.5)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
"""


def stop_with_owner(server_pid: int) -> subprocess.Popen:
    """Start the watcher that stops ``server_pid`` once this process is gone."""
    return subprocess.Popen(
        [sys.executable, "-c", SERVER_WATCHER, str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API, or start one temporary local server for this run.

    Prefect would start its ephemeral server lazily in each process, so every
    process-pool or Dask worker would boot a private server of its own (seconds each)
    and report its task runs there. One server, announced through PREFECT_API_URL,
    is shared by the whole run instead. The server stops when this process ends, however
    it ends (see SERVER_WATCHER).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    class OwnedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            process = super()._run_uvicorn_command()
            # Watched from its first second: a kill during the minute of migrations counts too.
            self.watcher = stop_with_owner(process.pid)
            return process

    server = OwnedServer()
    # start() registers the server's stop at exit, which runs after Prefect's log and
    # event workers have drained: stopping it here would drop the run's last logs.
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@contextlib.contextmanager
def bounded_api_retries():
    """Fewer Prefect client retries, so a Prefect API that died fails the run in about a minute.

    Prefect retries each failed request 5 times with 2, 4, ... 32 s waits (a minute per
    request, several requests in a row); 2 retries wait 2 + 4 s. A user's own setting wins.
    """
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if "PREFECT_CLIENT_MAX_RETRIES" in os.environ:
        yield
        return
    os.environ["PREFECT_CLIENT_MAX_RETRIES"] = str(CLI_CLIENT_MAX_RETRIES)  # for child processes
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: CLI_CLIENT_MAX_RETRIES}):
            yield
    finally:
        os.environ.pop("PREFECT_CLIENT_MAX_RETRIES", None)


# --------------------------------------------------------------------------- the API watchdog


def api_unreachable(url: Optional[str], timeout: float = 3.0) -> bool:
    """True when nothing answers at the API's address (any HTTP answer counts as alive)."""
    if not url:
        return False
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError:
        return True
    return False


def watch_api(url: Optional[str], on_gone: Callable[[float], None], every: float = 5.0,
              gone_after: float = API_GONE_AFTER_SECONDS) -> threading.Event:
    """Call ``on_gone(seconds)`` once the API has not answered for ``gone_after`` seconds; set the event to stop.

    A task that computes (training, a transform) talks to the API only when it ends, so
    without this a run whose API died would go on for minutes, then fail on a refused
    connection that names nothing.
    """
    stop = threading.Event()

    def watch() -> None:
        last_answer = time.monotonic()
        while not stop.wait(every):
            if not api_unreachable(url, timeout=every):
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer >= gone_after and not stop.is_set():
                on_gone(time.monotonic() - last_answer)
                return

    if url:
        threading.Thread(target=watch, name="prefect-api-watch", daemon=True).start()
    return stop


def exit_api_gone(url: str) -> Callable[[float], None]:
    def exit_now(seconds: float) -> None:
        print(
            f"\npneumo: the Prefect API at {url} went away: no answer for {seconds:.0f} s.\n"
            "  Start it again (or unset PREFECT_API_URL to use a temporary one) and re-run the same command: "
            "the stages that finished are cached and are not repeated.",
            file=sys.stderr, flush=True,
        )
        sys.stdout.flush()
        # Nothing can be reported to a dead API, and Prefect's workers would retry it for minutes at exit.
        os._exit(1)

    return exit_now


# --------------------------------------------------------------------------- the terminal


class WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving its traceback out."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def is_failure_record(record: logging.LogRecord) -> bool:
    """Prefect's own reports of a failure, which the CLI sums up in one line at the end."""
    message = str(record.msg)
    if message.startswith("Finished in state Failed"):  # INFO for a flow run, ERROR for a task run
        return True
    return record.levelno >= logging.ERROR and (
        record.exc_info is not None
        or message.startswith("Task run failed with exception")
        or message.startswith("Encountered exception during execution")
    )


# Prefect's notices about its temporary server ("Starting temporary server on ... See https://www.prefect.io/docs/...",
# "Stopping temporary server ..."): every run printed them, the second after the run's summary.
PREFECT_NOTICES = ("Starting temporary server", "Stopping temporary server")


def without_prefect_notices() -> None:
    """Keep Prefect's server notices off the terminal, so the run's summary is the last thing printed."""
    logging.getLogger("prefect").addFilter(lambda record: not str(record.msg).startswith(PREFECT_NOTICES))


def terminal_without_tracebacks() -> None:
    """Tracebacks and repeated failure lines go to the Prefect log only, not to the terminal."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
                handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))
                handler.addFilter(lambda record: not is_failure_record(record))


def failure_message(error: BaseException, api_url: Optional[str], api_gone: bool) -> str:
    """Two lines: why the run failed, and what to do next."""
    from tasks.retry import is_retryable

    if api_gone:
        return (
            f"pneumo: the Prefect API at {api_url} went away during the run ({type(error).__name__}: {error}).\n"
            "  Start it again (or unset PREFECT_API_URL to use a temporary one) and re-run the same command: "
            "the stages that finished are cached and are not repeated."
        )
    if is_retryable(error):
        hint = "retries exhausted; if the cause was passing, re-run the same command: finished stages are cached"
    else:
        hint = "not retried: trying again cannot fix this; correct what it names and re-run"
    return f"pneumo: the run failed: {error}\n  ({hint}; --verbose shows the traceback, the Prefect log always has it)"


# --------------------------------------------------------------------------- a command-line run


def run_flow(call: Callable[[], Any], on_success: Callable[[Any, float], None], *,
             verbose: bool = False, process_pool: bool = False) -> int:
    """``call()`` (a flow call) with a Prefect API, bounded retries and the watchdog; the exit code.

    On success ``on_success(result, seconds)`` prints the summary; on failure one message
    says why and what to do next (the traceback stays in the Prefect log unless ``verbose``).
    ``process_pool`` starts the transform pool's forkserver alongside the Prefect server.
    """
    global API_GONE
    from pneumo import pool

    without_prefect_notices()
    if not verbose:
        terminal_without_tracebacks()
    started = time.perf_counter()
    if process_pool:
        pool.warm_up()
    with prefect_api(), bounded_api_retries():
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        stop_watching = watch_api(api_url, exit_api_gone(api_url))
        try:
            result = call()
        except Exception as error:  # the Prefect log has the traceback; end on the reason and the next step
            stop_watching.set()
            API_GONE = api_unreachable(api_url)
            print(f"\n{failure_message(error, api_url, API_GONE)}", file=sys.stderr, flush=True)
            return 1
        stop_watching.set()
    on_success(result, time.perf_counter() - started)
    return 0


def exit_process(code: int) -> None:
    """End the process with ``code``; at once when the API went away, whose retries would hold the exit for minutes."""
    if API_GONE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
