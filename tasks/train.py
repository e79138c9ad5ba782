"""Task 4: train TinyNet on the shards, evaluate it, and register a new model version."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pneumo import evaluate, registry, train
from pneumo.config import TrainConfig
from pneumo.shards import IndexRef
from tasks.caching import cache_policy


@task(
    name="train-evaluate-register",
    retries=2,
    retry_delay_seconds=[10, 60],
    cache_policy=cache_policy("pneumo.train", "pneumo.model", "pneumo.evaluate", "pneumo.registry", "pneumo.shards"),
)
def train_evaluate_register(
    index: IndexRef, manifest_digest: str, config: TrainConfig, registry_uri: str, model_name: str
) -> registry.ModelRef:
    """Train, score val and test at the configured threshold, register, and move `latest`."""
    logger = get_run_logger()

    def progress(epoch: dict) -> None:
        if epoch["epoch"] % 10 == 0 or epoch.get("last"):
            logger.info(
                "epoch %d: train loss %.4f, val loss %.4f, val AUC %.4f",
                epoch["epoch"], epoch["train_loss"], epoch["val_loss"], epoch["val_auc"],
            )

    fitted = train.fit_from_index(index.uri, config, progress=progress)
    card = registry.build_card(
        fitted, config=config, manifest_digest=manifest_digest, shards_digest=index.digest, counts=index.counts
    )
    ref = registry.register(registry_uri, model_name, fitted.state_dict, card)
    registry.set_alias(registry_uri, model_name, "latest", ref.version)

    for split in ("val", "test"):
        m = fitted.metrics[split]
        logger.info(
            "%s (n=%d): accuracy %.4f, precision %.4f, recall %.4f, specificity %.4f, F1 %.4f, ROC AUC %s",
            split, m["n"], m["accuracy"], m["precision"], m["recall"], m["specificity"], m["f1"], m["roc_auc"],
        )
    create_table_artifact(key="model-metrics", table=evaluate.rows(fitted.metrics), description=f"{model_name} {ref.version}")
    create_markdown_artifact(
        key="model-card",
        markdown=f"# {model_name} {ref.version}\n\n{evaluate.markdown_table(fitted.metrics)}\n\nCard: `{ref.card_uri}`\n",
    )
    logger.info("registered %s %s at %s", model_name, ref.version, ref.card_uri)
    return ref
