"""Batch scoring (`pneumo predict-batch`, deployed as ``pneumo-predict/batch``): every image of a folder, zip or
s3:// prefix through a registered model, into ``{workdir}/predictions/{model}/{version}/{input digest}.csv``.
Images under NORMAL/ or PNEUMONIA/ folders are also scored against those labels.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.states import Completed

from pneumo import cleanup, download, pool, predict, storage, workdir as layout
from pneumo.config import BatchOptions
from pneumo.summary import batch_summary, predict_outcome
from tasks.drift import check_batch
from tasks.options import rerun_if_outputs_missing, task_runner, with_run_options
from tasks.predict import score_chunk, write_predictions
from tasks.reporting import predict_quarantine, publish_predictions

@flow(name="pneumo-predict")
def predict_batch(input: str, batch: BatchOptions = BatchOptions()) -> dict[str, Any]:
    """Score every image of ``input`` with ``batch.alias`` (or ``batch.version``) of the registered model.

    The version is fixed when the run starts; a re-run on the same input and version is a
    cache hit. Files that are not usable images are quarantined with their reason.
    """
    with cleanup.recording_run(layout.absolute(batch.workdir)):  # as `pneumo run`: `pneumo gc` removes nothing meanwhile
        return score_input(input, batch)


def score_input(input: str, batch: BatchOptions) -> Any:
    """The batch flow's work: fetch, score in chunks, write the predictions and the quarantine, report."""
    workdir, model_name, chunk_size = layout.absolute(batch.workdir), batch.model_name, batch.chunk_size
    registry = batch.registry_uri()
    version = predict.resolve_version(registry, model_name, batch.alias, batch.version)
    logger = get_run_logger()
    model = predict.Predictor.from_registry(registry, model_name, version=version)  # refuses unusable cards now
    logger.info("scoring with %s %s (threshold %g)", model_name, version, model.threshold)

    fingerprint = download.source_fingerprint(input)
    root = download.fetch(input, layout.downloads(workdir), progress=logger.info)
    images = predict.list_inputs(root)
    if not images:
        raise ValueError(f"no files found in {input}")
    chunks = [images[i : i + chunk_size] for i in range(0, len(images), chunk_size)]
    logger.info("%d files from %s in %d chunk(s) on the %s runner", len(images), root, len(chunks), batch.runner)

    rows, cached = score_chunks(chunks, fingerprint, registry, version, batch)
    folder = layout.predictions(workdir, model_name, version)
    uri = storage.join(folder, f"{fingerprint[:16]}.csv")
    rerun_if_outputs_missing(with_run_options(write_predictions, workdir, batch.retries), rows, uri, outputs=lambda u: [u])

    quarantine_uri = predict_quarantine(rows, storage.join(folder, f"{fingerprint[:16]}-quarantine.json"), logger)
    summary = batch_summary(f"{model_name} {version}", model.threshold, input, rows, uri, quarantine_uri, (cached, len(chunks)))
    summary["drift"] = check_batch([row for row in rows if row["error"] is None], registry, model_name, version, input)
    publish_predictions(summary, [row for row in rows if row["error"] is None], model.threshold)
    outcome = predict_outcome(summary)
    logger.info("run summary: %s", outcome)
    return Completed(message=outcome, data=summary)  # the message is what `pneumo runs` and the UI show


def score_chunks(chunks: list, fingerprint: str, registry: str, version: str, batch: BatchOptions) -> tuple[list[dict], int]:
    """score-chunk mapped over ``chunks`` on threads (with ``processes`` the pixel work runs in a local process pool):
    the rows, and how many chunks came from the cache."""
    scorer = with_run_options(score_chunk, layout.absolute(batch.workdir), batch.retries)
    workers = batch.workers
    score_pool = pool.ProcessPool(min(workers or os.cpu_count() or 1, len(chunks))) if batch.runner == "processes" else None
    try:
        with task_runner("threads", workers) as chunk_runner:
            futures = chunk_runner.map(
                scorer,
                {"images": chunks, "fingerprint": unmapped(fingerprint), "registry": unmapped(registry),
                 "model_name": unmapped(batch.model_name), "version": unmapped(version), "pool": unmapped(score_pool)},
            )
            rows = [row for chunk_rows in futures.result() for row in chunk_rows]
            return rows, sum(future.state.name == "Cached" for future in futures)
    finally:
        if score_pool:
            score_pool.close()

