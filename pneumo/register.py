"""Stage 4, register a new version: train it, score it, register it with its card, put it up for champion.

Named for what the stage leaves behind, a registered version (as stage 2 leaves size
percentiles and stage 3 shards); pneumo.registry is the store it writes to. No Prefect here:
``tasks/register.py`` adds retries, caching and artifacts around ``train_evaluate_register``,
and anyone can call it directly to retrain and register.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict

from pneumo import evaluate, plots, promotion, reference, registry, report, shard_files, train
from pneumo.config import TrainConfig, TransformConfig
from pneumo.names import DEFAULT_CHAMPION_METRIC

log = logging.getLogger(__name__)


class Registered(BaseModel):
    """What one run of the stage produced: the new version, its scores, and how the champion fared."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ref: registry.ModelRef
    metrics: dict[str, dict[str, Any]]  # "val" and "test"
    training: dict[str, Any]
    comparison: promotion.Decision  # the decision recorded in the card, before registration
    champion_val: Optional[dict[str, Any]] = None  # the val metrics the challenger was compared with
    promotion: promotion.Promotion  # how the promotion ended
    evaluation: evaluate.Evaluation  # CIs, shift suite, history and predictions of val and test
    pictures: dict[str, bytes]  # PNG name -> bytes, also written beside the card

    @property
    def is_champion(self) -> bool:
        return self.promotion.is_champion


@dataclass(frozen=True)
class Scored:
    """A trained model scored on val and test, with its pictures: everything of the card but the registry's part."""

    trained: train.TrainResult
    evaluation: evaluate.Evaluation
    warnings: list[str]  # splits too small to trust
    pictures: dict[str, bytes]
    reference: Optional[reference.Reference] = None  # the training rows in brief: stored as reference.json

    @property
    def files(self) -> dict[str, bytes]:
        """The files registered beside model.pt: the pictures and reference.json."""
        stored = {} if self.reference is None else {reference.REFERENCE_NAME: self.reference.to_json()}
        return {**self.pictures, **stored}

    def reference_fields(self) -> dict[str, Any]:
        """The card's ``ood``: where the reference is and the distance past which a film is flagged."""
        if self.reference is None:
            return {}
        ref = self.reference
        return {"ood": {"file": reference.REFERENCE_NAME, "cutoff": ref.ood_cutoff, "quantile": ref.cutoff_quantile,
                        "n_rows": ref.n_rows, "slope_cutoff": ref.slope_cutoff,
                        "distance": "Mahalanobis, Ledoit-Wolf covariance of the training films' own rows"}}

    @property
    def training(self) -> dict[str, Any]:
        """The card's ``training``: how the run went, epoch by epoch."""
        trained = self.trained
        return {
            "best_epoch": trained.best_epoch, "epochs_run": len(trained.history), "stopped_early": trained.stopped_early,
            "n_train": trained.n_train, "seconds": round(trained.seconds, 2), "history": self.evaluation.history,
            **({"averaged_from": trained.averaged_from} if trained.averaged_from else {}),
        }


STEPS_AFTER_TRAINING = ("scoring val and test", "drawing the pictures", "registering")


def check_stress_val(index_uri: str, config: TrainConfig, champion_metric: str) -> None:
    """ValueError, before any training, when the champion metric or the threshold rule needs a stress val the shards lack."""
    needs_stress = [what for what, needed in (
        (f"champion metric {champion_metric}", champion_metric.startswith("stress_")),
        (f"threshold rule {config.threshold_rule}", config.threshold_rule.startswith("stress_")),
    ) if needed]
    if needs_stress and not shard_files.index_config(index_uri)["transform"].get("shift_suite"):
        raise ValueError(
            f"{' and '.join(needs_stress)} need the stress val, which the shift suite stores: turn it on "
            "(--transform.shift-suite), or choose --run.champion-metric roc_auc and --train.threshold-rule fixed"
        )


def train_and_score(
    index_uri: str,
    config: TrainConfig,
    *,
    progress: Optional[Callable[[dict], None]] = None,
    logger: Any = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> Scored:
    """Train TinyNet on the shards of ``index_uri``, choose the threshold (``config.threshold_rule``:
    fixed, or on the stress val), score val and test once, and draw the pictures."""
    step, logger = on_step or (lambda name: None), logger or log
    data = {split: shard_files.load_split(index_uri, split) for split in ("train", "val", "test")}
    for split, part in data.items():
        if len(part.labels) == 0:
            raise ValueError(f"the {split} split of {index_uri} is empty; the dataset is too small to carve it by patient")
    trained = train.train(
        data["train"].features, data["train"].labels, data["val"].features, data["val"].labels, config, progress=progress
    )
    logger.info(
        "trained on %d rows in %.1fs: best epoch %d of %d%s",
        trained.n_train, trained.seconds, trained.best_epoch, len(trained.history),
        " (stopped early)" if trained.stopped_early else "",
    )
    # The threshold first (it may be chosen on the stress val), then the one scoring pass:
    # metrics with CIs by patient, the stress val, the shift suite, the per-epoch history.
    step(STEPS_AFTER_TRAINING[0])
    threshold = evaluate.decision_threshold(trained.state_dict, data["val"], config.threshold_rule, config.threshold)
    transform = TransformConfig.stored(shard_files.index_config(index_uri)["transform"])
    evaluation = evaluate.evaluate_model(
        trained.state_dict, {split: data[split] for split in ("val", "test")},
        threshold, trained.history, best_epoch=trained.best_epoch, threshold_rule=config.threshold_rule, transform=transform,
    )
    if config.threshold_rule != "fixed":
        logger.info("threshold %.4f (%s)", threshold, config.threshold_rule)
    warnings = evaluate.small_split_warnings(evaluation.metrics)
    for warning in warnings:
        logger.warning("%s", warning)
    step(STEPS_AFTER_TRAINING[1])
    films = data["train"].originals()
    ref = reference.build(films.features, evaluation.predictions["val"][1], grid=transform.grid,
                          slope_part=transform.pooling.index("mean") if "mean" in transform.pooling else 0,
                          val_features=data["val"].features,  # the drift check's yardstick (pneumo.drift)
                          train_borders=films.borders)  # its border test (None: the transform trims nothing)
    logger.info("out-of-distribution cut-off %.2f (Mahalanobis, %.1fth percentile of the training rows)",
                ref.ood_cutoff, ref.cutoff_quantile)
    return Scored(trained, evaluation, warnings, plots.render_evaluation(evaluation), ref)


def new_card(
    scored: Scored, index_uri: str, manifest_digest: str, config: TrainConfig, recipe: str,
    comparison: promotion.Decision, card_extra: Optional[dict[str, Any]] = None, run: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The card of the new version, before registration: ``registry.register`` adds its name, version and files."""
    index = shard_files.index_ref(index_uri)
    return registry.build_card(
        state_dict=scored.trained.state_dict,
        metrics=scored.evaluation.metrics,
        training=scored.training,
        config={"recipe": recipe, **(run or {}), "train": config.model_dump(mode="json"),
                **shard_files.index_config(index_uri)},
        manifest_digest=manifest_digest,
        shards_digest=index.digest,
        counts=index.counts,
        champion_comparison=comparison.to_json(),
        recipe=recipe,
        warnings=scored.warnings,
        **scored.evaluation.card_fields(plots=sorted(scored.pictures)),
        **scored.reference_fields(),
        **(card_extra or {}),
    )


def register_and_promote(
    registry_uri: str, model_name: str, scored: Scored, card: dict[str, Any], champion_metric: str,
    champion_val: promotion.ChampionVal, logger: Any = None,
) -> tuple[str, promotion.Promotion]:
    """Register the version with its pictures and report, point ``latest`` at it, and put it up for champion."""
    logger = logger or log
    pictures = scored.pictures
    # The pictures, the reference and the report are written with the version, before its card: a card never lists
    # missing files, and its integrity covers them.
    version = registry.register(
        registry_uri, model_name, scored.trained.state_dict, card, extra_files=scored.files,
        render_files=lambda full_card: {report.REPORT_NAME: report.render(full_card, pictures).encode()},
    )
    registry.set_alias(registry_uri, model_name, "latest", version)
    outcome = promotion.promote(
        registry_uri, model_name, version, promotion.comparable(scored.evaluation.metrics), champion_metric,
        champion_val=champion_val, logger=logger,
    )
    if outcome.is_champion:
        logger.info("champion: %s %s (%s)", model_name, version, outcome.reason)
    else:
        logger.info("champion stays %s: %s %s not promoted (%s)", outcome.champion_version, model_name, version, outcome.reason)
    return version, outcome


def train_evaluate_register(
    index_uri: str,
    manifest_digest: str,
    config: TrainConfig,
    registry_uri: str,
    model_name: str,
    champion_metric: str = DEFAULT_CHAMPION_METRIC,
    *,
    recipe: str,
    run: Optional[dict[str, Any]] = None,
    progress: Optional[Callable[[dict], None]] = None,
    logger: Any = None,
    card_extra: Optional[dict[str, Any]] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> Registered:
    """Train and score (``train_and_score``), compare with the champion, build the card
    (``new_card``), register the version and make it ``champion`` if it beats the champion on
    ``champion_metric`` (``register_and_promote``): by default the ROC AUC on the stress val,
    on which the champion is re-scored too. Val and test are scored once: the card's metrics
    and the promotion's challenger figures are the same numbers.

    ``logger`` is any logging.Logger-like object (Prefect's run logger in the task).
    ``recipe`` names the preset the shards and ``config`` came from (pneumo.recipes); ``run``, the
    rest of the run config (where, and its ``run`` section), is stored in the card's config beside
    the sections, so the card holds the RunConfig whole;
    ``card_extra`` keys are added to the card as they are. ``on_step(name)`` is called as
    each step after training (STEPS_AFTER_TRAINING) starts, so progress can show them.
    """
    promotion.validate_champion_metric(champion_metric)
    registry.validate_model_name(model_name)
    check_stress_val(index_uri, config, champion_metric)
    scored = train_and_score(index_uri, config, progress=progress, logger=logger, on_step=on_step)
    (on_step or (lambda name: None))(STEPS_AFTER_TRAINING[2])
    scores: dict[str, tuple[dict[str, Any], str]] = {}

    def champion_val(version: str) -> tuple[dict[str, Any], str]:
        # Scored once per version: the comparison below and the promotion reuse it.
        if version not in scores:
            scores[version] = promotion.champion_val_metrics(registry_uri, model_name, version, index_uri)
        return scores[version]

    # Compare before registering: the immutable card records the decision as it stood then.
    # The notes (alias missing, broken or corrupt) are logged as warnings by promote().
    rival = promotion.champion_to_beat(registry_uri, model_name, None, champion_metric, champion_val)
    val = promotion.comparable(scored.evaluation.metrics)
    comparison = promotion.compare(champion_metric, val, rival.version, rival.val, rival.basis, rival.notes)
    card = new_card(scored, index_uri, manifest_digest, config, recipe, comparison, card_extra, run)
    version, outcome = register_and_promote(registry_uri, model_name, scored, card, champion_metric, champion_val, logger)
    return Registered(
        ref=registry.model_ref(registry_uri, model_name, version),
        metrics=scored.evaluation.metrics,
        training=scored.training,
        comparison=comparison,
        champion_val=scores[outcome.champion_version][0] if outcome.champion_version in scores else None,
        promotion=outcome,
        evaluation=scored.evaluation,
        pictures=scored.pictures,
    )
