"""A pool of local processes for CPU-bound work, cheap to start and able to heal.

Workers are forked from a forkserver that has already imported the pipeline's modules, so
a new pool computes within a fraction of a second, where a freshly spawned interpreter
spends seconds importing. The forkserver is started once per process (``warm_up``), best
while other work runs. Where there is no forkserver (Windows) the pool spawns instead:
slower to start, same results.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# What the workers compute with, imported once in the forkserver: the shard writer, and the
# blur of the shift suite (scipy.ndimage, imported lazily by pneumo.shift so the parent does not pay for it).
WORKER_MODULES = ("pneumo.shards", "scipy.ndimage")


def preload() -> list[str]:
    """Modules the forkserver imports once, so that every worker starts with them.

    multiprocessing re-runs the main module in each new worker, so it should find that
    module's imports done:

    - a module run with ``-m`` (a deployment's ``python -m prefect.engine``) is re-run by
      name; the server imports its top-level package. Not the module itself, nor anything
      that imports it: runpy warns when it runs a module that is already imported.
    - a script (``python flows/full.py``) is re-run from its path. Preloading "__main__"
      should cover it but does nothing up to Python 3.13 at least (forkserver looks for a
      "main_path" key that spawn never sets), so the server imports the modules the
      script's names come from.
    """
    main = sys.modules["__main__"]
    spec_name = getattr(main.__spec__, "name", None)
    if spec_name and not spec_name.endswith("__main__"):
        return [spec_name.partition(".")[0], *WORKER_MODULES]
    modules = set(WORKER_MODULES)
    for value in vars(main).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name in sys.modules and name not in ("__main__", "builtins"):
            modules.add(name)
    return sorted(modules)


def start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def warm_up() -> None:
    """Start the forkserver in the background; later pools fork from it at once."""
    if start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload())
    # Started with Ctrl-C ignored, which the forkserver and the workers it forks inherit: a
    # terminal's SIGINT reaches the whole process group, and the owner stops the workers itself
    # (a traceback from each of them is noise). Signal handlers can only be set from the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        forkserver.ensure_running()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _in_context(cwd: str, environment: dict[str, str], fn: Callable[..., T], *args: Any) -> T:
    """Call fn in the caller's working directory and environment (AWS settings, ...).

    A forked worker inherits the forkserver's, which date from the server's start.
    """
    os.chdir(cwd)
    if os.environ != environment:
        os.environ.clear()
        os.environ.update(environment)
    return fn(*args)


def _exit_with_parent() -> None:
    """Worker initializer: exit once the process that owns the pool is gone.

    A worker whose owner was killed (SIGKILL, an OOM kill) would otherwise wait forever for
    work, and keep the forkserver alive with it.
    """
    owner = multiprocessing.parent_process()
    if owner is None:
        return

    def watch() -> None:
        owner.join()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ProcessPool:
    """Runs functions in worker processes; a pool whose worker died is replaced.

    A worker killed mid-task (out of memory, a crashing decoder) breaks a
    ProcessPoolExecutor for good. ``run`` raises BrokenProcessPool for the calls that were
    in flight and swaps in a fresh executor, so a retry of the same call can succeed.
    The forkserver and the processes start on first use, so a pool whose every call is skipped
    (a cached run) costs nothing: warming up beside a fully cached run cost it ~5 s of its
    2 cores under load.
    """

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _new_executor(self) -> ProcessPoolExecutor:
        warm_up()
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(start_method()), initializer=_exit_with_parent
        )

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()
            executor = self._executor
        try:
            return executor.submit(_in_context, os.getcwd(), dict(os.environ), fn, *args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._executor is executor:
                    executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = self._new_executor()
            raise

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
