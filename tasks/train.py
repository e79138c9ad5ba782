"""Task 4: train TinyNet on the shards, evaluate it, and register a new model version."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pneumo import evaluate, plots, registry, shards, storage, train
from pneumo.config import TrainConfig
from tasks.caching import cache_policy
from tasks.reporting import model_report_artifacts


@task(
    name="train-evaluate-register",
    retries=2,
    retry_delay_seconds=[10, 60],
    cache_policy=cache_policy("pneumo.train", "pneumo.model", "pneumo.evaluate", "pneumo.registry", "pneumo.shards", "pneumo.plots"),
)
def train_evaluate_register(
    index: shards.IndexRef,
    manifest_digest: str,
    config: TrainConfig,
    registry_uri: str,
    model_name: str,
    champion_metric: str = "roc_auc",
) -> registry.ModelRef:
    """Train, score val and test, register, move `latest`, and move `champion` if the new model beats it."""
    logger = get_run_logger()
    registry.validate_champion_metric(champion_metric)

    def progress(epoch: dict) -> None:
        if epoch["epoch"] % 50 == 0:
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %s",
                epoch["epoch"], config.epochs, epoch["train_loss"], epoch["val_loss"], epoch["val_auc"],
            )

    fitted = train.fit_from_index(index.uri, config, progress=progress)
    outcome = fitted.result
    logger.info(
        "trained on %d rows in %.1fs: best epoch %d of %d%s",
        outcome.n_train, outcome.seconds, outcome.best_epoch, len(outcome.history),
        " (stopped early)" if outcome.stopped_early else "",
    )
    # Issue 9: CIs by patient, shift suite, per-epoch history and pictures of val and test.
    started = time.perf_counter()
    evaluation = evaluate.evaluate_model(
        fitted.state_dict, {split: shards.load_split(index.uri, split) for split in ("val", "test")},
        config.threshold, outcome.history, best_epoch=outcome.best_epoch,
    )
    pngs = plots.render_evaluation(evaluation)
    logger.info("CIs, shift suite and %d pictures in %.1fs", len(pngs), time.perf_counter() - started)
    # Compare before registering: the immutable card records the decision.
    champion = registry.get_alias(registry_uri, model_name, registry.CHAMPION)
    champion_val, basis = None, None
    if champion is not None:
        champion_val, basis = registry.champion_val_metrics(registry_uri, model_name, champion, index.uri)
    comparison = registry.compare(champion_metric, fitted.metrics["val"], champion, champion_val, basis)
    card = registry.build_card(
        state_dict=fitted.state_dict,
        metrics=evaluation.metrics,
        training={"best_epoch": outcome.best_epoch, "epochs_run": len(outcome.history),
                  "stopped_early": outcome.stopped_early, "n_train": outcome.n_train, "seconds": round(outcome.seconds, 2),
                  "history": evaluation.history},
        config={"train": config.model_dump(mode="json"), **shards.index_config(index.uri)},
        manifest_digest=manifest_digest,
        shards_digest=index.digest,
        counts=index.counts,
        champion_comparison=comparison,
        **evaluation.card_fields(plots=sorted(pngs)),
    )
    version = registry.register(registry_uri, model_name, fitted.state_dict, card)
    plots.write_all(storage.join(registry_uri, model_name, version), pngs)
    registry.set_alias(registry_uri, model_name, "latest", version)
    is_champion = registry.promote_if_better(registry_uri, model_name, version, comparison)
    ref = registry.model_ref(registry_uri, model_name, version)
    if is_champion:
        logger.info("champion: %s %s (%s)", model_name, version, comparison["reason"])
    elif comparison["promoted"]:
        logger.warning("champion: %s %s beat %s, but another run moved the champion meanwhile; not promoted",
                       model_name, version, comparison["champion_version"])
    else:
        logger.info("champion stays %s: %s %s not promoted (%s)", champion, model_name, version, comparison["reason"])

    for split in ("val", "test"):
        m = fitted.metrics[split]
        logger.info(
            "%s (n=%d): accuracy %.4f, precision %.4f, recall %.4f, specificity %.4f, F1 %.4f, ROC AUC %s",
            split, m["n"], m["accuracy"], m["precision"], m["recall"], m["specificity"], m["f1"], m["roc_auc"],
        )
    create_table_artifact(key="model-metrics", table=evaluate.rows(fitted.metrics), description=f"{model_name} {ref.version}")
    model_report_artifacts(model_name, ref.version, evaluation.metrics, evaluation.threshold, pngs, ref.card_uri)
    create_markdown_artifact(
        key="champion-challenger",
        markdown=evaluate.comparison_markdown(
            model_name, version, fitted.metrics["val"], comparison, champion_val, is_champion
        ),
        description=f"{model_name} {version} against the champion on val {champion_metric}",
    )
    logger.info("registered %s %s at %s", model_name, ref.version, ref.card_uri)
    return ref
