"""How a flow runs from the command line: its Prefect API, bounded client retries, a watchdog, Ctrl-C, its exit.

Prefect is imported only inside the functions. The flow knows nothing of this module: what Ctrl-C reports is asked of the API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

API_GONE_AFTER_SECONDS = float(os.environ.get("PNEUMO_API_GONE_AFTER_SECONDS", "30"))  # tests wait less
CLIENT_MAX_RETRIES = 4  # 2 + 4 + 8 + 16 s ride out a busy server's 503s; the watchdog ends a dead API's run
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def quiet_prefect() -> None:
    """Prefect's environment defaults, set before it is imported; a user's own values win."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage data, no first-run notice
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@dataclass
class CurrentRun:
    """The command's flow run: what Ctrl-C counts and cancels, whose page is printed. Written by this module only."""

    api_url: Optional[str] = None
    local: bool = False  # the local server (cli.server), not a configured PREFECT_API_URL
    flow_run_id: Optional[str] = None


current = CurrentRun()


@contextlib.contextmanager
def prefect_api(start: bool = True) -> Iterator[str]:
    """PREFECT_API_URL when set; else the local server (started if needed and ``start``), announced to child
    processes (without it every process-pool or Dask worker would boot a private ephemeral server)."""
    quiet_prefect()
    from prefect.settings import PREFECT_API_URL

    current.api_url, current.local = PREFECT_API_URL.value(), False
    if current.api_url:
        yield current.api_url
        return
    from cli import server as local_server

    if not start:  # `pneumo runs`: a listing starts nothing
        server = local_server.running()
        if server is None:
            print("pneumo: no Prefect server to ask: PREFECT_API_URL is not set and the local server is not running "
                  "(`pneumo server start`, or any `pneumo run`, starts it)", file=sys.stderr)
            raise SystemExit(2)
    else:
        try:
            server, started = local_server.ensure_running()
        except (RuntimeError, ValueError, OSError) as error:  # no traceback: what failed, and the way around it
            print(f"pneumo: {error}\n  (set PREFECT_API_URL to use another Prefect server)", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        what = "started the local Prefect server in the background" if started else "using the local Prefect server"
        print(f"pneumo: {what}: UI {server.url} (`pneumo server stop` stops it)", file=sys.stderr, flush=True)
    current.api_url, current.local = server.api_url, True
    with exported("PREFECT_API_URL", server.api_url):
        yield server.api_url


@contextlib.contextmanager
def exported(name: str, value: Any) -> Iterator[None]:
    """The Prefect setting ``name`` for this process and its children (through the environment), until the end."""
    import prefect.settings

    os.environ[name] = str(value)
    try:
        with prefect.settings.temporary_settings({getattr(prefect.settings, name): value}):
            yield
    finally:
        os.environ.pop(name, None)


def api_post(path: str, body: dict, timeout: float) -> Any:
    request = urllib.request.Request(f"{current.api_url.rstrip('/')}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def api_unreachable(url: Optional[str], timeout: float = 3.0) -> bool:
    """True when nothing answers at the API's address (any HTTP answer counts as alive)."""
    if not url:
        return False
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return False
    except (OSError, ValueError):
        return True
    return False


def watch_api(url: str, every: float = 5.0, gone_after: float = API_GONE_AFTER_SECONDS) -> threading.Event:
    """Exit 1 once the API has not answered for ``gone_after`` s (a computing task would find out only when it ends)."""
    stop = threading.Event()

    def watch() -> None:
        last_answer = time.monotonic()
        while not stop.wait(every):
            if not api_unreachable(url, timeout=every):
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer >= gone_after and not stop.is_set():
                print(f"\npneumo: the Prefect API at {url} went away: no answer for {time.monotonic() - last_answer:.0f} s."
                      f"\n  {restart_hint()}", file=sys.stderr, flush=True)
                exit_now(1)  # nothing can be reported to a dead API; Prefect's exit would retry it for minutes

    threading.Thread(target=watch, name="prefect-api-watch", daemon=True).start()
    return stop


def restart_hint() -> str:
    where = ("A re-run starts the local Prefect server again" if current.local
             else "Start it again (or unset PREFECT_API_URL to use the local Prefect server)")
    return f"{where} and re-run the same command: the stages that finished are cached and are not repeated."


def exit_now(code: int) -> None:
    """End the process now, its workers first (a process pool would compute on for nobody)."""
    stop_workers()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------- Ctrl-C


def interrupted_message(timeout: float = 1.0) -> str:
    """What an interrupt says: the stages (task names) whose runs completed, hence cached, asked of the API."""
    if not (current.api_url and current.flow_run_id):
        return "interrupted before the run started; run the same command again to start it"
    try:
        done = api_post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [current.flow_run_id]},
                                                            "state": {"type": {"any_": ["COMPLETED"]}}},
                                              "sort": "EXPECTED_START_TIME_ASC", "limit": 200}, timeout)
        count = len({run["task_key"] for run in done})
        cached = f"{count} finished stage{'s are' if count != 1 else ' is'} cached"
    except Exception:  # a slow or dead API: say it without the count
        cached = "the finished stages are cached"
    return f"interrupted: {cached}; re-run the same command to resume"


def cancel_flow_run(timeout: float = 1.0) -> None:
    """Best effort: mark the flow run Cancelled, so the UI does not show it running forever."""
    if current.api_url and current.flow_run_id:
        with contextlib.suppress(Exception):
            api_post(f"/flow_runs/{current.flow_run_id}/set_state",
                     {"state": {"type": "CANCELLED", "name": "Interrupted", "message": "Ctrl-C"}, "force": True}, timeout)


def stop_workers() -> None:
    """SIGKILL this process's descendants in its session (pools, forkserver, Dask workers), not the server in its own."""
    import psutil

    session = os.getsid(0)
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(child.pid) == session:
                child.kill()


class Interrupts:
    """Ctrl-Cs as seen by the Python handler and by the wakeup fd (which sees them while the main thread is in C code)."""

    def __init__(self) -> None:
        self.lock, self.seen, self.installed, self.stopping = threading.Lock(), {"handler": 0, "wakeup": 0}, False, False

    def on(self, path: str) -> None:
        with self.lock:
            self.seen[path] += 1
            first, self.stopping = not self.stopping, True
        if max(self.seen.values()) >= 2:  # a second Ctrl-C: now
            os._exit(INTERRUPTED_EXIT_CODE)
        if first:
            threading.Thread(target=stop_now, name="pneumo-interrupt", daemon=True).start()


interrupts = Interrupts()


def stop_now() -> None:
    stop_workers()
    cancelling = threading.Thread(target=cancel_flow_run, daemon=True)
    cancelling.start()
    below_a_bar = "\n" if sys.stderr.isatty() else ""  # a progress bar may hold the terminal's last line
    print(f"{below_a_bar}pneumo: {interrupted_message()}", file=sys.stderr, flush=True)
    cancelling.join(1.0)
    exit_now(INTERRUPTED_EXIT_CODE)  # not through Prefect's exit, which drains logs to the API for seconds


def stop_on_interrupt() -> None:
    """Ctrl-C: one line, the workers stopped, exit 130 (no KeyboardInterrupt, no traceback); a second Ctrl-C exits at once."""
    if interrupts.installed or threading.current_thread() is not threading.main_thread():
        return
    interrupts.installed = True
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.signal(signal.SIGINT, lambda number, frame: interrupts.on("handler"))
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch_wakeup_fd() -> None:
        while True:
            for number in os.read(read_end, 64):
                if number == signal.SIGINT:
                    interrupts.on("wakeup")

    threading.Thread(target=watch_wakeup_fd, name="pneumo-sigint", daemon=True).start()


# --------------------------------------------------------------------------- the terminal


class WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving its traceback out (the Prefect log keeps it)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def for_the_terminal(record: logging.LogRecord) -> bool:
    """False for Prefect's own failure reports (summed up in one line at the end) and its lines about our hook."""
    message = str(record.msg)
    if message.startswith("Finished in state Failed") or (remember_flow_run.__name__ in message and "hook" in message.lower()):
        return False
    return not (record.levelno >= logging.ERROR and (
        record.exc_info is not None or message.startswith(("Task run failed with exception", "Encountered exception"))))


def terminal_without_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.Logger.manager.loggerDict))]:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
                handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))
                handler.addFilter(for_the_terminal)


def failure_message(error: BaseException, api_gone: bool) -> str:
    """Two lines: why the run failed, and what to do next."""
    from tasks.retry import is_retryable

    if api_gone:
        return (f"pneumo: the Prefect API at {current.api_url} went away during the run "
                f"({type(error).__name__}: {error}).\n  {restart_hint()}")
    if is_retryable(error):
        hint = "retries exhausted; if the cause was passing, re-run the same command: finished stages are cached"
    else:
        hint = "not retried: trying again cannot fix this; correct what it names and re-run"
    return f"pneumo: the run failed: {error}\n  ({hint}; --verbose shows the traceback, the Prefect log always has it)"


# --------------------------------------------------------------------------- a command-line run


def remember_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """An on_running hook: the flow run Ctrl-C cancels and counts, and whose UI page is printed."""
    current.flow_run_id = str(flow_run.id)


def run_page(api_url: str, flow_run_id: Any) -> str:
    """The flow run's page in the Prefect UI (PREFECT_UI_URL, else the UI beside the API)."""
    from prefect.settings import PREFECT_UI_URL

    ui_url = PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def print_run_page(stream: Any) -> None:
    if current.api_url and current.flow_run_id:
        print(f"  run page     {run_page(current.api_url, current.flow_run_id)}", file=stream, flush=True)


def run_flow(flow: Any, parameters: dict[str, Any], on_success: Callable[[Any, float], None], *,
             verbose: bool = False) -> int:
    """``flow(**parameters)`` under the API, retries, watchdog and Ctrl-C; on failure why and what next; the run page last."""
    stop_on_interrupt()
    if not verbose:
        terminal_without_tracebacks()
    started = time.perf_counter()
    current.flow_run_id = None
    # Bounded client retries (Prefect's 5 wait up to 62 s per request); a user's own setting wins.
    retries = contextlib.nullcontext() if "PREFECT_CLIENT_MAX_RETRIES" in os.environ else exported(
        "PREFECT_CLIENT_MAX_RETRIES", CLIENT_MAX_RETRIES)
    with prefect_api() as api_url, retries:
        stop_watching = watch_api(api_url)
        try:
            result = flow.with_options(on_running=[*flow.on_running_hooks, remember_flow_run])(**parameters)
        except Exception as error:  # the Prefect log has the traceback; end on the reason and the next step
            stop_watching.set()
            gone = api_unreachable(api_url)
            print(f"\n{failure_message(error, gone)}", file=sys.stderr, flush=True)
            if gone:
                exit_now(1)
            print_run_page(sys.stderr)
            return 1
        stop_watching.set()
    on_success(result, time.perf_counter() - started)
    print_run_page(sys.stdout)
    return 0
