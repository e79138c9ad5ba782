"""Batch scoring tasks: score a chunk of images, write the predictions file and its report."""

from __future__ import annotations

import time
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.transactions import get_transaction

from pneumo import predict, storage
from pneumo.pool import ProcessPool
from tasks.caching import cache_policy
from tasks.retry import retry_options


@task(
    name="score-chunk",
    **retry_options(),
    # The source fingerprint is an input, so changed files change the key; where the
    # pixels are computed does not change the predictions.
    cache_policy=cache_policy(ignore=("pool",)),
)
def score_chunk(
    images: list[predict.InputImage],
    fingerprint: str,
    registry: str,
    model_name: str,
    version: str,
    pool: Optional[ProcessPool] = None,
) -> list[dict[str, Any]]:
    """Prediction rows of one chunk, computed in ``pool`` if given (one model load per worker)."""
    started = time.perf_counter()
    args = (registry, model_name, version, images)
    rows = pool.run(predict.score_inputs, *args) if pool else predict.score_inputs(*args)
    seconds = time.perf_counter() - started
    errors = sum(row["error"] is not None for row in rows)
    logger = get_run_logger()
    logger.info(
        "%d images scored, %d quarantined, %.1fs (%.0f images/s)", len(rows) - errors, errors, seconds,
        len(rows) / max(seconds, 1e-9),
    )
    unread = sum(predict.read_failed(row["error"]) for row in rows)
    transaction = get_transaction()
    if unread and transaction is not None:
        # A file gone or unreadable now (a `pneumo gc`, a remount) may be back for the next run: not a result to reuse.
        transaction.write_on_commit = False
        logger.warning("%d file(s) could not be read: this chunk's result is not cached, a re-run scores it again", unread)
    return rows


@task(
    name="write-predictions",
    **retry_options(),
    cache_policy=cache_policy(),
)
def write_predictions(rows: list[dict[str, Any]], uri: str) -> str:
    """Write the predictions CSV (scored images only) and return its URI."""
    storage.write_bytes(uri, predict.predictions_csv(rows))
    get_run_logger().info("predictions: %s", uri)
    return uri
