"""Task 4: train TinyNet on the shards, evaluate it, and register a new model version (pneumo.register)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pneumo import evaluate, registry, shard_files
from pneumo.config import TrainConfig
from pneumo.names import metric_label
from tasks import progress as stage_progress
from tasks.caching import cache_policy
from tasks.reporting import model_report_artifacts
from tasks.retry import retry_options

if TYPE_CHECKING:  # imported where it runs: training pulls in torch (seconds)
    from pneumo.register import Registered


@contextlib.contextmanager
def _progress(config: TrainConfig, steps: tuple[str, ...], logger: Any) -> Iterator[tuple[Callable, Callable]]:
    """(progress, on_step) for pneumo.register: a training bar over the epochs, then an evaluation bar over ``steps``."""
    stage = stage_progress.open_stage("training-progress", "training", config.epochs, "epochs")

    def progress(epoch: dict) -> None:
        auc = epoch["val_auc"]
        stage.advance(1, f"val AUC {evaluate.format_metric(auc)}" if isinstance(auc, float) else None)
        if epoch["epoch"] % 50 == 0:
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %s",
                epoch["epoch"], config.epochs, epoch["train_loss"], epoch["val_loss"], evaluate.format_metric(auc, 4),
            )

    stages = [stage]  # the open ones

    def on_step(name: str) -> None:
        # Evaluation is its own step: the training bar ends at the epochs run, then this one moves.
        if stages[-1] is stage:
            stages.append(stage_progress.open_stage("evaluation-progress", "evaluation", len(steps), "steps"))
            stage_progress.close_stage(stages.pop(0))
            stages[0].advance(0, name)
        else:
            stages[0].advance(1, name)

    try:
        yield progress, on_step
        if stages[0] is not stage:
            stages[0].advance(1)  # the last step (registering) is done too
    finally:
        for open_stage in stages:
            stage_progress.close_stage(open_stage)


def _report(result: Registered, model_name: str, champion_metric: str, logger: Any) -> None:
    """The new version's metrics in the log, and its metrics, pictures and champion decision as artifacts."""
    from pneumo import promotion

    ref, metrics = result.ref, result.metrics
    for split in [s for s in ("val", "stress_val", "test") if s in metrics]:
        m = metrics[split]
        shown = {key: evaluate.format_metric(m[key], 4) for key in evaluate.CI_METRICS}
        logger.info(
            "%s (n=%d): accuracy %s, precision %s, recall %s, specificity %s, F1 %s, ROC AUC %s",
            split, m["n"], shown["accuracy"], shown["precision"], shown["recall"], shown["specificity"], shown["f1"],
            shown["roc_auc"],
        )
    splits = {split: metrics[split] for split in ("val", "test")}  # metrics also holds "shift"
    create_table_artifact(key="model-metrics", table=evaluate.rows(splits, digits=4), description=f"{model_name} {ref.version}")
    model_report_artifacts(model_name, ref.version, metrics, result.evaluation.threshold, result.pictures, ref.card_uri)
    create_markdown_artifact(
        key="champion-challenger",
        markdown=evaluate.comparison_markdown(
            model_name, ref.version, promotion.comparable(metrics), result.promotion.to_json(), result.champion_val,
            result.is_champion,
        ),
        description=f"{model_name} {ref.version} against the champion on {metric_label(champion_metric)}",
    )


@task(
    name="train-evaluate-register",
    **retry_options(),
    # The run's own settings go on the card; a change of --run.workers or --run.retries alone trains nothing.
    # Nor does the drift check of the new data against the champion (it goes on the card as it stood).
    cache_policy=cache_policy(ignore=("run", "drift")),
)
def train_evaluate_register(
    index: shard_files.IndexRef,
    manifest_digest: str,
    config: TrainConfig,
    registry_uri: str,
    model_name: str,
    champion_metric: str,
    recipe: str,
    run: Optional[dict[str, Any]] = None,
    drift: Optional[dict[str, Any]] = None,
) -> registry.ModelRef:
    """Train, score val and test, register, move `latest`, and move `champion` if the new model beats it.
    ``recipe`` names the preset ``config`` came from: the card records it, and ``drift``, the check
    of the training films against the champion's (tasks.drift.check_training_data)."""
    # Here, not at the top: training pulls in torch, scikit-learn and matplotlib (seconds), which a
    # cached run (this task's cache hit) never needs.
    from pneumo import register

    logger = get_run_logger()
    with _progress(config, register.STEPS_AFTER_TRAINING, logger) as (progress, on_step):
        result = register.train_evaluate_register(
            index.uri, manifest_digest, config, registry_uri, model_name, champion_metric,
            recipe=recipe, run=run, progress=progress, logger=logger, on_step=on_step,
            card_extra={"drift": drift} if drift else None,
        )
    _report(result, model_name, champion_metric, logger)
    logger.info("registered %s %s at %s", model_name, result.ref.version, result.ref.card_uri)
    return result.ref
