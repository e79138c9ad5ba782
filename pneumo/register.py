"""Stage 4, register a new version: train it, score it, register it with its card, put it up for champion.

Named for what the stage leaves behind, a registered version (as stage 2 leaves size
percentiles and stage 3 shards); pneumo.registry is the store it writes to. No Prefect here:
``tasks/register.py`` adds retries, caching and artifacts around ``train_evaluate_register``,
and anyone can call it directly to retrain and register.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict

from pneumo import evaluate, plots, promotion, registry, report, shard_files, train
from pneumo.config import TrainConfig
from pneumo.names import DEFAULT_CHAMPION_METRIC

log = logging.getLogger(__name__)


class Registered(BaseModel):
    """What one run of the stage produced: the new version, its scores, and how the champion fared."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ref: registry.ModelRef
    metrics: dict[str, dict[str, Any]]  # "val" and "test"
    training: dict[str, Any]
    comparison: dict[str, Any]  # the decision recorded in the card, before registration
    champion_val: Optional[dict[str, Any]] = None  # the val metrics the challenger was compared with
    promotion: dict[str, Any]  # how the promotion ended (promotion.promote)
    evaluation: evaluate.Evaluation  # CIs, shift suite, history and predictions of val and test
    pictures: dict[str, bytes]  # PNG name -> bytes, also written beside the card

    @property
    def is_champion(self) -> bool:
        return bool(self.promotion["is_champion"])


STEPS_AFTER_TRAINING = ("scoring val and test", "drawing the pictures", "registering")


def train_evaluate_register(
    index_uri: str,
    manifest_digest: str,
    config: TrainConfig,
    registry_uri: str,
    model_name: str,
    champion_metric: str = DEFAULT_CHAMPION_METRIC,
    *,
    progress: Optional[Callable[[dict], None]] = None,
    logger: Any = None,
    recipe: str,
    run: Optional[dict[str, Any]] = None,
    card_extra: Optional[dict[str, Any]] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> Registered:
    """Train TinyNet on the shards of ``index_uri``, score val and test, register a new version,
    point ``latest`` at it, and make it ``champion`` if it beats the champion on
    ``champion_metric`` (compare-and-swap, see ``promotion.promote``): by default the ROC AUC
    on the stress val, on which the champion is re-scored too.

    The decision threshold follows ``config.threshold_rule``: fixed, or chosen on the stress val.

    Val and test are loaded and scored once: the card's metrics and the promotion's challenger
    figures are the same numbers.

    ``logger`` is any logging.Logger-like object (Prefect's run logger in the task).
    ``recipe`` names the preset the shards and ``config`` came from (pneumo.recipes); ``run``, the
    run's own settings (RunOptions), is stored in the card's config beside the sections;
    ``card_extra`` keys are added to the card as they are. ``on_step(name)`` is called as
    each step after training (STEPS_AFTER_TRAINING) starts, so progress can show them.
    """
    step = on_step or (lambda name: None)
    logger = logger or log
    promotion.validate_champion_metric(champion_metric)
    registry.validate_model_name(model_name)
    index = shard_files.index_ref(index_uri)
    needs_stress = [what for what, needed in (
        (f"champion metric {champion_metric}", champion_metric.startswith("stress_")),
        (f"threshold rule {config.threshold_rule}", config.threshold_rule.startswith("stress_")),
    ) if needed]
    if needs_stress and not shard_files.index_config(index_uri)["transform"].get("shift_suite"):
        raise ValueError(
            f"{' and '.join(needs_stress)} need the stress val, which the shift suite stores: turn it on "
            "(--transform.shift-suite), or choose --run.champion-metric roc_auc and --train.threshold-rule fixed"
        )

    data = {split: shard_files.load_split(index_uri, split) for split in ("train", "val", "test")}
    for split, part in data.items():
        if len(part.labels) == 0:
            raise ValueError(f"the {split} split of {index_uri} is empty; the dataset is too small to carve it by patient")
    outcome = train.train(
        data["train"].features, data["train"].labels, data["val"].features, data["val"].labels, config, progress=progress
    )
    logger.info(
        "trained on %d rows in %.1fs: best epoch %d of %d%s",
        outcome.n_train, outcome.seconds, outcome.best_epoch, len(outcome.history),
        " (stopped early)" if outcome.stopped_early else "",
    )

    # The threshold first (it may be chosen on the stress val), then the one scoring pass:
    # metrics with CIs by patient, the stress val, the shift suite, the per-epoch history.
    step(STEPS_AFTER_TRAINING[0])
    threshold = evaluate.decision_threshold(outcome.state_dict, data["val"], config.threshold_rule, config.threshold)
    evaluation = evaluate.evaluate_model(
        outcome.state_dict, {split: data[split] for split in ("val", "test")},
        threshold, outcome.history, best_epoch=outcome.best_epoch, threshold_rule=config.threshold_rule,
    )
    if config.threshold_rule != "fixed":
        logger.info("threshold %.4f (%s)", threshold, config.threshold_rule)
    val = promotion.comparable(evaluation.metrics)  # what the card records and what the promotion compares
    warnings = evaluate.small_split_warnings(evaluation.metrics)
    for warning in warnings:
        logger.warning("%s", warning)
    step(STEPS_AFTER_TRAINING[1])
    pictures = plots.render_evaluation(evaluation)
    step(STEPS_AFTER_TRAINING[2])

    scores: dict[str, tuple[dict[str, Any], str]] = {}

    def champion_val(version: str) -> tuple[dict[str, Any], str]:
        # Scored once per version: the comparison below and the promotion reuse it.
        if version not in scores:
            scores[version] = promotion.champion_val_metrics(registry_uri, model_name, version, index_uri)
        return scores[version]

    # Compare before registering: the immutable card records the decision as it stood then.
    _, _, champion, champion_vals, basis, notes = promotion.champion_to_beat(
        registry_uri, model_name, None, champion_metric, champion_val
    )
    # The notes (alias missing, broken or corrupt) are logged as warnings by promote() below.
    comparison = promotion.compare(champion_metric, val, champion, champion_vals, basis, notes)
    training = {
        "best_epoch": outcome.best_epoch, "epochs_run": len(outcome.history), "stopped_early": outcome.stopped_early,
        "n_train": outcome.n_train, "seconds": round(outcome.seconds, 2), "history": evaluation.history,
        **({"averaged_from": outcome.averaged_from} if outcome.averaged_from else {}),
    }
    card = registry.build_card(
        state_dict=outcome.state_dict,
        metrics=evaluation.metrics,
        training=training,
        config={"recipe": recipe, **({"run": run} if run else {}), "train": config.model_dump(mode="json"),
                **shard_files.index_config(index_uri)},
        manifest_digest=manifest_digest,
        shards_digest=index.digest,
        counts=index.counts,
        champion_comparison=comparison,
        **{"recipe": recipe, "warnings": warnings, **evaluation.card_fields(plots=sorted(pictures)), **(card_extra or {})},
    )
    # The pictures and the report are written with the version, before its card: a card never lists missing files.
    version = registry.register(
        registry_uri, model_name, outcome.state_dict, card, extra_files=pictures,
        render_files=lambda full_card: {report.REPORT_NAME: report.render(full_card, pictures).encode()},
    )
    registry.set_alias(registry_uri, model_name, "latest", version)
    decision = promotion.promote(
        registry_uri, model_name, version, val, champion_metric,
        champion_val=champion_val, logger=logger,
    )
    if decision["is_champion"]:
        logger.info("champion: %s %s (%s)", model_name, version, decision["reason"])
    else:
        logger.info(
            "champion stays %s: %s %s not promoted (%s)",
            decision["champion_version"], model_name, version, decision["reason"],
        )
    return Registered(
        ref=registry.model_ref(registry_uri, model_name, version),
        metrics=evaluation.metrics,
        training=training,
        comparison=comparison,
        champion_val=scores[decision["champion_version"]][0] if decision["champion_version"] in scores else None,
        promotion=decision,
        evaluation=evaluation,
        pictures=pictures,
    )
