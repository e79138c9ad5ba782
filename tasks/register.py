"""Task 4: train TinyNet on the shards, evaluate it, and register a new model version (pneumo.register)."""

from __future__ import annotations

from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pneumo import evaluate, registry, shard_files
from pneumo.config import TrainConfig
from pneumo.names import metric_label
from tasks import progress as stage_progress
from tasks.caching import cache_policy
from tasks.reporting import model_report_artifacts
from tasks.retry import retry_options


@task(
    name="train-evaluate-register",
    **retry_options(),
    # The run's own settings go on the card; a change of --workers or --retries alone trains nothing.
    cache_policy=cache_policy(ignore=("run",)),
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
) -> registry.ModelRef:
    """Train, score val and test, register, move `latest`, and move `champion` if the new model beats it."""
    # Here, not at the top: training pulls in torch, scikit-learn and matplotlib (seconds), which a
    # cached run (this task's cache hit) never needs.
    from pneumo import promotion, register

    logger = get_run_logger()

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
            stages.append(stage_progress.open_stage(
                "evaluation-progress", "evaluation", len(register.STEPS_AFTER_TRAINING), "steps"))
            stage_progress.close_stage(stages.pop(0))
            stages[0].advance(0, name)
        else:
            stages[0].advance(1, name)

    try:
        result = register.train_evaluate_register(
            index.uri, manifest_digest, config, registry_uri, model_name, champion_metric,
            progress=progress, logger=logger, recipe=recipe, run=run, on_step=on_step,
        )
        if stages[0] is not stage:
            stages[0].advance(1)  # the last step (registering) is done too
    finally:
        for open_stage in stages:
            stage_progress.close_stage(open_stage)
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
            model_name, ref.version, promotion.comparable(metrics), result.promotion, result.champion_val,
            result.is_champion,
        ),
        description=f"{model_name} {ref.version} against the champion on {metric_label(champion_metric)}",
    )
    logger.info("registered %s %s at %s", model_name, ref.version, ref.card_uri)
    return ref
