"""The one retry policy of every pneumo task: what is retried, how often, and how long it waits.

Retried: what can pass by itself (a dropped connection, a timeout, S3 throttling or a
5xx answer beyond botocore's own attempts, a transform worker that died). Not retried:
what fails the same way every time (a bad source, an unsafe archive, too much bad data,
"no dataset found", a validation error, S3 credentials, permissions or a missing bucket),
so a run reports it at once instead of after minutes of backoff.

Every task gets its options from ``retry_options`` (the decorators and the flow's
``--retries`` alike), so the numbers live here only.
"""

from __future__ import annotations

import http.client
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pneumo.download import UnsafeArchive
from pneumo.quarantine import TooMuchBadData

DEFAULT_RETRIES = 3
MAX_RETRIES = 20
BACKOFF_BASE_SECONDS = 2.0
JITTER_FACTOR = 0.2
# With jitter each delay is at most 5 minutes, and all of a task's delays together at most 30.
MAX_DELAY_SECONDS = 300.0
MAX_TOTAL_DELAY_SECONDS = 1800.0

# Fails the same way on every try: a fix of the input or the settings is needed.
PERMANENT: tuple[type[BaseException], ...] = (
    UnsafeArchive,
    TooMuchBadData,
    ValueError,  # bad source, "no dataset found", pydantic validation errors, corrupt shards, ...
    TypeError,
    KeyError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
# Can pass by itself.
TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    BrokenProcessPool,
    http.client.HTTPException,
)


def is_retryable(error: BaseException) -> bool:
    """Whether trying again can help; errors that say so themselves (``retryable``) decide."""
    said = getattr(error, "retryable", None)
    if isinstance(said, bool):
        return said
    if isinstance(error, TRANSIENT):
        return True
    if isinstance(error, PERMANENT):
        return False
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.response.get("Error", {}).get("Code") in {"SlowDown", "Throttling"}
    if isinstance(error, BotoCoreError):
        return True  # connection and read errors botocore gave up on
    # Unknown: retry, as Prefect would; the bounded backoff keeps this cheap.
    return True


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only a failure ``is_retryable`` accepts."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return True  # not an exception (a crashed state): let Prefect's retries handle it
    return is_retryable(error)


def retry_delays(retries: int) -> list[float]:
    """Exponential backoff (2, 4, 8, ... s), each delay capped, the total capped.

    Delays that would take the total past MAX_TOTAL_DELAY_SECONDS are dropped, so
    ``len(result)`` can be less than ``retries``. Caps allow for the jitter Prefect adds.
    """
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, got {retries}")
    cap = MAX_DELAY_SECONDS / (1 + JITTER_FACTOR)
    budget = MAX_TOTAL_DELAY_SECONDS / (1 + JITTER_FACTOR)
    delays: list[float] = []
    for attempt in range(retries):
        delay = min(BACKOFF_BASE_SECONDS * 2**attempt, cap)
        if sum(delays) + delay > budget:
            break
        delays.append(delay)
    return delays


def retry_options(retries: int = DEFAULT_RETRIES) -> dict[str, Any]:
    """``task.with_options``/``@task`` keywords for ``retries`` tries under the policy."""
    delays = retry_delays(retries)
    return {
        "retries": len(delays),
        # Prefect reads an empty list as "no delay"; it is only used when retries > 0.
        "retry_delay_seconds": delays or 0,
        "retry_jitter_factor": JITTER_FACTOR,
        "retry_condition_fn": retry_condition,
    }
