"""Drift checks in Prefect: the check of a batch and of a retrain's new data, its events and its artifact.

The statistics are pneumo.drift's. Every check emits ``pneumo.drift.checked``; a ``drift``
verdict also emits ``pneumo.drift.detected``, on which infra/prefect.yaml's trigger starts the
retrain deployment. The event's resource is the version checked against
(``pneumo.model.<name>.<version>``) with ``pneumo.drift.origin``: ``batch`` (the batch flow),
``command`` (`pneumo drift`) or ``retrain`` (a run's new training data, which the trigger
leaves out: a retrain must not start the next one).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pneumo import drift, registry as reg, shard_files
from pneumo.config import TransformConfig
from tasks.retry import retry_options

CHECKED, DETECTED = "pneumo.drift.checked", "pneumo.drift.detected"


def resource(model_name: str, version: str, origin: str) -> dict[str, str]:
    """The event's resource: the version the films were compared with, and who compared them."""
    return {"prefect.resource.id": f"pneumo.model.{model_name}.{version}", "prefect.resource.name": f"{model_name} {version}",
            "pneumo.model.name": model_name, "pneumo.model.version": version, "pneumo.drift.origin": origin}


def publish(outcome: drift.Outcome, origin: str, source: str) -> None:
    """The events (when there is a verdict) and the markdown artifact of a check."""
    from prefect.context import FlowRunContext
    from prefect.events.worker import EventsWorker

    if outcome.report is not None:
        where = resource(outcome.model, outcome.version, origin)
        payload = {**outcome.record(), "source": source}
        emit_event(event=CHECKED, resource=where, payload=payload)
        if outcome.verdict == "drift":
            emit_event(event=DETECTED, resource=where, payload=payload)
        if FlowRunContext.get() is None:  # `pneumo drift`: sent before the command exits (a run sends them as it ends)
            EventsWorker.drain_all()
    create_markdown_artifact(key="drift-check", markdown=outcome.markdown(source),
                             description=f"verdict: {outcome.verdict or outcome.message}")


@task(name="check-drift", **retry_options(), cache_policy=NO_CACHE)
def check_batch(rows: list[dict[str, Any]], registry: str, model_name: str, version: str, source: str) -> dict:
    """The scored films of a batch against the version's reference: the check's record for the run summary."""
    scored = [row for row in rows if row["error"] is None and row.get("features") is not None]
    features = np.array([row["features"] for row in scored], dtype=np.float64).reshape(len(scored), -1)
    trimmed = [row.get("borders") for row in scored]
    borders = None if None in trimmed else np.array(trimmed, dtype=np.float64).reshape(len(scored), 2)
    outcome = drift.check_version(registry, model_name, version, features, np.array([row["probability"] for row in scored]),
                                  borders=borders)
    publish(outcome, "batch", source)
    get_run_logger().info("drift check against %s %s: %s", model_name, version, " | ".join(outcome.lines()[:1]))
    return outcome.record()


@task(name="check-training-drift", **retry_options(), cache_policy=NO_CACHE)
def check_training_data(index: shard_files.IndexRef, registry: str, model_name: str, source: str) -> Optional[dict]:
    """The run's training films against the champion's reference, before training; None without a champion."""
    champion = reg.get_alias(registry, model_name, reg.CHAMPION) if reg.list_versions(registry, model_name) else None
    if champion is None:
        return None
    transform = TransformConfig.stored(shard_files.index_config(index.uri)["transform"])
    train = shard_files.load_split(index.uri, "train")
    films = train.originals()
    outcome = drift.check_version(registry, model_name, champion, films.features, transform=transform, borders=films.borders)
    publish(outcome, "retrain", source)
    get_run_logger().info("the training films against %s %s: %s", model_name, champion, outcome.lines()[0])
    return outcome.record()
