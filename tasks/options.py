"""How the flows run their tasks: the run's retries, where results persist, a check of cached outputs, the task runner.

Task results (and cache records) persist under ``{workdir}/prefect-results`` (a folder or
an S3 prefix), each record signed: tasks/result_storage.py. This is the one module that
decides where.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from prefect import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pneumo import storage, workdir as layout
from tasks.result_storage import SignedResultStorage, signed_storage_block
from tasks.retry import retry_options

def with_run_options(task: Any, workdir: str, retries: int, *, refresh: bool = False) -> Any:
    """The task with the run's retry budget (under the one policy, tasks/retry.py) and its results persisted under the workdir.

    ``refresh`` runs it for real even on a cache hit (its new result replaces the cached one).
    """
    options: dict[str, Any] = {**retry_options(retries), "persist_result": True, "result_storage": result_storage(workdir)}
    if refresh:
        options["refresh_cache"] = True
    return task.with_options(**options)


def rerun_if_outputs_missing(task: Any, *args: Any, outputs: Callable[[Any], list[str]], **kwargs: Any) -> Any:
    """``task(*args, **kwargs)``; if the files its result names (``outputs(result)``) are gone, run it again for real.

    Prefect's cache remembers results, not files: a cache hit whose files were deleted
    must recompute rather than hand a dangling reference downstream.
    """
    result = task(*args, **kwargs)
    missing = [uri for uri in outputs(result) if not storage.exists(uri)]
    if not missing:
        return result
    get_run_logger().warning("%s: %d output(s) missing (e.g. %s); recomputing", task.name, len(missing), missing[0])
    return task.with_options(refresh_cache=True)(*args, **kwargs)


def task_runner(runner: str, workers: Optional[int] = None, dask_address: Optional[str] = None):
    """The Prefect task runner for mapped tasks (one per shard, one per scoring chunk); ``runner`` as flows/settings.py's Runner.

    ``processes`` and ``threads`` both run the tasks on threads of this process; with
    ``processes`` each task hands its pixel work to a local process pool (flows/full.py):
    h5py holds a global lock, so threads alone do not scale.
    """
    if runner in ("threads", "processes"):
        # One thread per worker process: a task's run time is then its shard's own.
        return ThreadPoolTaskRunner(max_workers=workers or os.cpu_count())
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers or os.cpu_count(), "threads_per_worker": 1, "processes": True}
    )


def result_storage(workdir: str) -> SignedResultStorage:
    """Where a task's results persist: ``{workdir}/prefect-results``, every record signed (tasks/result_storage.py).

    A record planted in the workdir is refused and recomputed, never unpickled.
    """
    return signed_storage_block(layout.prefect_results(workdir))
