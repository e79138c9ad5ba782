"""Batch scoring tasks: score a chunk of images, write the predictions file and its report."""

from __future__ import annotations

import time
from typing import Any, Optional

from prefect import get_run_logger, task

from pneumo import predict, storage
from pneumo.pool import ProcessPool
from tasks.caching import cache_policy
from tasks.retry import retry_options


@task(
    name="score-chunk",
    **retry_options(),
    # The source fingerprint is an input, so changed files change the key; where the
    # pixels are computed does not change the predictions.
    cache_policy=cache_policy("pneumo.predict", "pneumo.transform", "pneumo.sizes", "pneumo.model", ignore=("pool",)),
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
    get_run_logger().info(
        "%d images scored, %d quarantined, %.1fs (%.0f images/s)", len(rows) - errors, errors, seconds,
        len(rows) / max(seconds, 1e-9),
    )
    return rows


@task(
    name="write-predictions",
    **retry_options(),
    cache_policy=cache_policy("pneumo.predict"),
)
def write_predictions(rows: list[dict[str, Any]], uri: str) -> str:
    """Write the predictions CSV (scored images only) and return its URI."""
    storage.write_bytes(uri, predict.predictions_csv(rows))
    get_run_logger().info("predictions: %s", uri)
    return uri
