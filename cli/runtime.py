"""How a flow runs from the command line: its Prefect API, client retries, a watchdog, Ctrl-C, and its exit.

- ``prefect_api``: the configured Prefect API (PREFECT_API_URL); else the project's local server
  (flows/prefect_server.py: started in the background if none is up, kept after the run, so
  the UI links work); or, with ``PNEUMO_PREFECT_SERVER=temporary`` (tests, CI), one temporary
  server for the run, stopped when this process ends however it ends (its watcher).
- ``bounded_api_retries`` and ``watch_api``: a Prefect API that dies fails the run in
  about a minute, with a message that says so, rather than after many minutes of retries.
- ``stop_on_interrupt``: Ctrl-C stops the workers, says how much is cached and exits 130 within
  a second or two; a second Ctrl-C exits at once.
- ``run_flow``: `pneumo run` and `python flows/full.py` around a flow call: tracebacks kept
  off the terminal, the one-line failure message, the run's UI page and the exit code;
  ``exit_process`` ends the process.

Importing this module sets Prefect's environment defaults, so import it before Prefect.
Prefect itself is imported only inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
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
SERVER_MODE_VARIABLE = "PNEUMO_PREFECT_SERVER"  # "local" (default): the server that stays; "temporary": one per run
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

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


def server_mode() -> str:
    mode = os.environ.get(SERVER_MODE_VARIABLE) or "local"
    if mode not in ("local", "temporary"):
        raise ValueError(f"{SERVER_MODE_VARIABLE} must be 'local' or 'temporary', got {mode!r}")
    return mode


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API, else the project's local server, else (when asked) a temporary one.

    Without an API, Prefect would start its ephemeral server lazily in each process, so every
    process-pool or Dask worker would boot a private server of its own (seconds each) and
    report its task runs there. One server, announced through PREFECT_API_URL, is shared by
    the whole run instead.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    context = temporary_server() if server_mode() == "temporary" else local_server()
    with context as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # for child processes
        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@contextlib.contextmanager
def local_server():
    """The project's local Prefect server (flows/prefect_server.py), started if none is up and kept after the run."""
    from cli import server as prefect_server

    uses = contextlib.ExitStack()
    try:
        server, started = uses.enter_context(prefect_server.in_use())
    except (RuntimeError, ValueError, OSError) as error:  # no traceback: what failed, and the ways around it
        print(f"pneumo: {error}\n  (set PREFECT_API_URL to use another Prefect server, or "
              f"{SERVER_MODE_VARIABLE}=temporary for one that lives as long as the run)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    with uses:
        RunProgress.server = "local"
        if started:
            print(f"pneumo: started the local Prefect server in the background: UI {server.url} "
                  f"(stops after {server.idle_minutes:g} min idle; `pneumo server stop` stops it now)",
                  file=sys.stderr, flush=True)
        else:
            print(f"pneumo: using the local Prefect server: UI {server.url}", file=sys.stderr, flush=True)
        yield server.api_url


@contextlib.contextmanager
def temporary_server():
    """One temporary local Prefect server for this run, stopped when this process ends, however it ends (SERVER_WATCHER)."""
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
    RunProgress.server = "temporary"
    yield server.api_url


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
            f"  {restart_hint()} and re-run the same command: "
            "the stages that finished are cached and are not repeated.",
            file=sys.stderr, flush=True,
        )
        sys.stdout.flush()
        # Nothing can be reported to a dead API, and Prefect's workers would retry it for minutes at exit.
        os._exit(1)

    return exit_now


def restart_hint() -> str:
    """What to do about a Prefect API that went away: which one it was decides."""
    if RunProgress.server == "local":
        return "A re-run starts the local Prefect server again (`pneumo server status` says why it stopped)"
    if RunProgress.server == "temporary":
        return "This run's temporary Prefect server stopped; nothing else to start"
    return "Start it again (or unset PREFECT_API_URL to use the local Prefect server)"


# --------------------------------------------------------------------------- Ctrl-C


class RunProgress:
    """What an interrupt reports: the flow run, and the stages finished (hence cached) so far."""

    flow_run_id: Optional[str] = None
    server = "configured"  # or "local", or "temporary" (whose pages are gone after the run): set by prefect_api
    stages: tuple[str, ...] = ()
    finished: list[str] = []


def finished_stage(name: str) -> None:
    """The flow calls this after each stage: its result is persisted, so a re-run takes it from the cache."""
    if name not in RunProgress.finished:
        RunProgress.finished.append(name)


def remember_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """An on_running hook: the flow run an interrupt marks as cancelled, and whose UI page the CLI prints."""
    RunProgress.flow_run_id = str(flow_run.id)


def interrupted_message() -> str:
    if not RunProgress.stages:
        return "interrupted before the run started; run the same command again to start it"
    done = sum(stage in RunProgress.finished for stage in RunProgress.stages)
    return (f"interrupted: {done} of {len(RunProgress.stages)} stages are cached; "
            "re-run the same command to resume")


def cancel_flow_run(timeout: float = 1.0) -> None:
    """Best effort, within ``timeout``: mark the interrupted flow run Cancelled, so the UI does not show it running forever."""
    api_url = os.environ.get("PREFECT_API_URL")
    if not (api_url and RunProgress.flow_run_id):
        return
    import json
    import urllib.request

    body = json.dumps({"state": {"type": "CANCELLED", "name": "Interrupted",
                                 "message": interrupted_message()}, "force": True}).encode()
    request = urllib.request.Request(f"{api_url.rstrip('/')}/flow_runs/{RunProgress.flow_run_id}/set_state",
                                     data=body, headers={"Content-Type": "application/json"})
    with contextlib.suppress(Exception):
        urllib.request.urlopen(request, timeout=timeout).close()


def stop_workers() -> None:
    """SIGKILL this process's descendants in its own session: the process pool, its forkserver, Dask's workers.

    The project's local Prefect server runs in a session of its own, so it stays up.
    """
    import psutil

    session = os.getsid(0)
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(child.pid) == session:
                child.kill()


class Interrupts:
    """Counts SIGINTs seen by two paths, the Python handler and the wakeup fd (which works while the
    main thread is stuck in C code); the larger count is the number of Ctrl-Cs."""

    lock = threading.Lock()
    seen = {"handler": 0, "wakeup": 0}
    installed = False
    stopping = False


def on_interrupt(path: str) -> None:
    with Interrupts.lock:
        Interrupts.seen[path] += 1
        count = max(Interrupts.seen.values())
        first, Interrupts.stopping = not Interrupts.stopping, True
    if count >= 2:  # a second Ctrl-C: now
        os._exit(INTERRUPTED_EXIT_CODE)
    if first:
        threading.Thread(target=stop_now, name="pneumo-interrupt", daemon=True).start()


def stop_now() -> None:
    print(f"\npneumo: {interrupted_message()}", file=sys.stderr, flush=True)
    cancel_flow_run()
    stop_workers()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    # No clean-up through Prefect: its exit drains logs and events to the API and can take tens of seconds.
    os._exit(INTERRUPTED_EXIT_CODE)


def watch_wakeup_fd(read_end: int) -> None:
    while True:
        for number in os.read(read_end, 64):
            if number == signal.SIGINT:
                on_interrupt("wakeup")


def stop_on_interrupt() -> None:
    """Ctrl-C: one line saying how much is cached, the workers stopped, exit 130 within about a second; a second Ctrl-C exits at once.

    No KeyboardInterrupt is raised, so no traceback reaches the terminal (each stage's finished
    result is already persisted; an unfinished one is redone by the re-run). Call it early, from
    the main thread; later calls do nothing.
    """
    if Interrupts.installed or threading.current_thread() is not threading.main_thread():
        return
    Interrupts.installed = True
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.signal(signal.SIGINT, lambda number, frame: on_interrupt("handler"))
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=watch_wakeup_fd, args=(read_end,), name="pneumo-sigint", daemon=True).start()


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


def is_own_hook_record(record: logging.LogRecord) -> bool:
    """Prefect's two lines around this module's on_running hook (remember_flow_run): noise for the user."""
    return remember_flow_run.__name__ in str(record.msg) and "hook" in str(record.msg).lower()


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
                handler.addFilter(lambda record: not is_failure_record(record) and not is_own_hook_record(record))


def failure_message(error: BaseException, api_url: Optional[str], api_gone: bool) -> str:
    """Two lines: why the run failed, and what to do next."""
    from tasks.retry import is_retryable

    if api_gone:
        return (
            f"pneumo: the Prefect API at {api_url} went away during the run ({type(error).__name__}: {error}).\n"
            f"  {restart_hint()} and re-run the same command: "
            "the stages that finished are cached and are not repeated."
        )
    if is_retryable(error):
        hint = "retries exhausted; if the cause was passing, re-run the same command: finished stages are cached"
    else:
        hint = "not retried: trying again cannot fix this; correct what it names and re-run"
    return f"pneumo: the run failed: {error}\n  ({hint}; --verbose shows the traceback, the Prefect log always has it)"


# --------------------------------------------------------------------------- a command-line run


def run_page(api_url: Optional[str]) -> Optional[str]:
    """The flow run's page in the Prefect UI, when the server outlives the run (not a temporary one)."""
    if not (api_url and RunProgress.flow_run_id) or RunProgress.server == "temporary":
        return None
    from prefect.settings import PREFECT_UI_URL

    ui_url = PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")
    return f"{ui_url.rstrip('/')}/runs/flow-run/{RunProgress.flow_run_id}"


def run_flow(flow: Any, parameters: dict[str, Any], on_success: Callable[[Any, float], None], *,
             stages: tuple[str, ...] = (), verbose: bool = False) -> int:
    """``flow(**parameters)`` with a Prefect API, bounded retries, the watchdog and Ctrl-C handling; the exit code.

    On success ``on_success(result, seconds)`` prints the summary; on failure one message
    says why and what to do next (the traceback stays in the Prefect log unless ``verbose``);
    either way the last line is the run's UI page. ``stages`` names the stages the flow reports
    with ``finished_stage`` (for Ctrl-C's message).
    """
    global API_GONE
    stop_on_interrupt()
    RunProgress.stages = tuple(stages)
    without_prefect_notices()
    if not verbose:
        terminal_without_tracebacks()
    started = time.perf_counter()
    with prefect_api(), bounded_api_retries():
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        stop_watching = watch_api(api_url, exit_api_gone(api_url))
        try:
            result = flow.with_options(on_running=[remember_flow_run])(**parameters)
        except Exception as error:  # the Prefect log has the traceback; end on the reason and the next step
            stop_watching.set()
            API_GONE = api_unreachable(api_url)
            print(f"\n{failure_message(error, api_url, API_GONE)}", file=sys.stderr, flush=True)
            page = run_page(api_url)
            if page and not API_GONE:
                print(f"  run page     {page}", file=sys.stderr, flush=True)
            return 1
        stop_watching.set()
    on_success(result, time.perf_counter() - started)
    page = run_page(api_url)
    if page:
        print(f"  run page     {page}", flush=True)
    return 0


def exit_process(code: int) -> None:
    """End the process with ``code``; at once when the API went away, whose retries would hold the exit for minutes."""
    if API_GONE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
