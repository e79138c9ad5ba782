"""Which version is champion: the rule, the re-scoring of the champion, and the compare-and-swap.

The registry (pneumo.registry) stores versions and aliases; this module decides. A challenger
becomes champion when its validation metric (one of CHAMPION_METRICS, higher is better) is
strictly greater than the champion's, both scored on the same val images when they can be.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from pneumo import registry, shard_files, storage
from pneumo.evaluate import format_metric, metrics
from pneumo.model import predict_proba
from pneumo.config import SplitConfig, TransformConfig
from pneumo.evaluate import stress_predictions
from pneumo.views import film_scores
from pneumo.names import CHAMPION_METRICS, metric_label
from pneumo.registry import CHAMPION, BrokenAlias, Card, CorruptModel

log = logging.getLogger(__name__)

# version -> (its val metrics, where they come from); raises CorruptModel for a damaged model
ChampionVal = Callable[[str], tuple[dict[str, Any], str]]


def validate_champion_metric(metric: str) -> str:
    if metric not in CHAMPION_METRICS:
        raise ValueError(f"invalid champion metric {metric!r}: choose one of {', '.join(CHAMPION_METRICS)}")
    return metric


def comparable(scores: dict[str, Any]) -> dict[str, Any]:
    """The figures a champion metric is read from: the val metrics, plus ``stress_roc_auc``
    when ``scores`` (a card's or an evaluation's ``metrics``) has the stress val."""
    stress = scores.get("stress_val") or {}
    return {**scores["val"], **({"stress_roc_auc": stress["roc_auc"]} if "roc_auc" in stress else {})}


def _same_rows(card: Card, index: dict[str, Any]) -> bool:
    """Whether the card's model reads val rows computed as this run's (``index``, the shards' index):
    same settings for an image's own row (train renditions and the shift suite may differ, as
    between robust and robust2)."""
    theirs = card.config.transform if card.config else None
    return theirs is not None and theirs.row_settings() == TransformConfig.stored(index["transform"]).row_settings()


def _same_val_images(card: Card, index: dict[str, Any]) -> bool:
    """Whether the card's figures come from this run's val images and stress jitters: the same
    data (manifest digest), split and shift seed."""
    config = card.config
    if card.data is None or config is None or config.transform is None or config.split is None:
        return False
    try:
        same_split = SplitConfig(**config.split) == SplitConfig(**index["split_config"])
    except (TypeError, ValueError):
        return False
    return (
        card.data.manifest_digest == index["manifest_digest"] and same_split
        and config.transform.shift_seed == index["transform"].get("shift_seed", 0)
    )


def champion_val_metrics(
    registry_uri: str, model_name: str, version: str, index_uri: Optional[str]
) -> tuple[dict[str, Any], str]:
    """The champion's validation metrics (``comparable``), and where they come from.

    When the champion reads val rows computed as this run's, it is scored again on this
    run's val split and stress val, so that both models are judged on the same images: new
    data also brings new val patients, and figures from two different val sets do not
    compare. Otherwise (or without ``index_uri``) its features are not comparable and its
    card's figures are used; the basis says whether they come from the same val images (same
    data, split and stress jitters: a recipe change on unchanged data). Its model file is
    verified either way (CorruptModel).
    """
    card = registry.load_card(registry_uri, model_name, version)
    state_dict = registry.load_state_dict(registry_uri, model_name, version)  # a corrupt champion is never compared
    if index_uri is None:
        return comparable(card.metrics), "champion's card"
    index = shard_files.read_index(index_uri)
    if not _same_rows(card, index):
        where = "the same val images and stress jitters" if _same_val_images(card, index) else "other val images"
        return comparable(card.metrics), f"champion's card ({where}, features computed differently)"
    val = shard_files.load_split(index_uri, "val")
    threshold = card.decision_threshold
    # The same rows and views as the champion's own scoring (row settings include the views).
    scores = metrics(val.labels, film_scores(lambda rows: predict_proba(state_dict, rows), val.features, val.views), threshold)
    if val.stress is None:
        return scores, "re-scored on this run's val split"
    labels, probs, _ = stress_predictions(state_dict, val)
    stress = metrics(labels, probs, threshold)
    return {**scores, "stress_roc_auc": stress["roc_auc"]}, "re-scored on this run's val split and stress val"


@dataclass(frozen=True)
class Decision:
    """The champion/challenger decision, as the challenger's card records it (``champion_comparison``)."""

    metric: str
    split: str  # "val" or "stress val"
    decided_by: str  # the metric as people read it
    challenger_value: Optional[float]
    champion_version: Optional[str]
    champion_value: Optional[float]
    basis: Optional[str]  # where the champion's figures come from
    promoted: bool
    reason: str
    notes: tuple[str, ...] = ()  # what was skipped on the way: a missing, broken or corrupt champion

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "notes": list(self.notes)}


@dataclass(frozen=True)
class Promotion(Decision):
    """How a promotion ended: the decision as it stood when the alias moved (or did not), kept as promotion.json."""

    attempts: int = 1
    conflicts: tuple[str, ...] = ()  # the champion moved under us: compared again
    decided_at: str = ""

    @property
    def is_champion(self) -> bool:
        return self.promoted

    def to_json(self) -> dict[str, Any]:
        """As promotion.json holds it: the decision's fields, then how it ended."""
        data = super().to_json()
        ended = {key: data.pop(key) for key in ("attempts", "conflicts", "decided_at")}
        return {**data, "is_champion": self.promoted, **ended, "conflicts": list(self.conflicts)}


@dataclass(frozen=True)
class Rival:
    """The version a challenger must beat, and the champion alias as read (to swap it)."""

    alias_target: Optional[str]  # the version the alias names, intact or not
    token: Optional[str]  # the alias's compare-and-swap token
    version: Optional[str] = None  # what to compare with: the champion, or the best intact version
    val: Optional[dict[str, Any]] = None  # its val metrics
    basis: Optional[str] = None
    notes: tuple[str, ...] = ()


def compare(
    metric: str,
    challenger_val: dict[str, Any],
    champion_version: str | None,
    champion_val: dict[str, Any] | None,
    basis: str | None = None,
    notes: tuple[str, ...] | list[str] = (),
) -> Decision:
    """The champion/challenger decision, as recorded in the challenger's card.

    The first model becomes champion. After that the challenger is promoted only when its
    validation ``metric`` is strictly greater than the champion's: a tie keeps the
    champion. A metric that could not be computed (ROC AUC of a one-class val split)
    loses to any number and never wins against a champion. ``notes`` say what was skipped
    on the way (a missing, broken or corrupt champion) and are kept with the decision.
    """
    validate_champion_metric(metric)
    challenger = challenger_val.get(metric)
    champion = None if champion_val is None else champion_val.get(metric)
    if champion_version is None and notes:  # the alias was broken or every other version corrupt
        promoted, reason = True, "no intact champion or version to compare with (see notes): the new model becomes champion"
    elif champion_version is None:
        promoted, reason = True, "no champion yet: the first model becomes champion"
    elif challenger is None:
        promoted, reason = False, f"challenger has no {metric_label(metric)}"
    elif champion is None:
        promoted, reason = True, f"champion {champion_version} has no {metric_label(metric)}"
    elif challenger > champion:
        promoted, reason = True, f"{metric_label(metric)} {format_metric(challenger, 4)} > {format_metric(champion, 4)}"
    else:
        promoted, reason = False, f"{metric_label(metric)} {format_metric(challenger, 4)} does not beat {format_metric(champion, 4)}"
    return Decision(
        metric=metric, split="stress val" if metric.startswith("stress_") else "val", decided_by=metric_label(metric),
        challenger_value=challenger, champion_version=champion_version, champion_value=champion, basis=basis,
        promoted=promoted, reason=reason, notes=tuple(notes),
    )


def _metric_key(val: Optional[dict[str, Any]], metric: str) -> float:
    value = (val or {}).get(metric)
    return float("-inf") if value is None else float(value)


def _best_standing_in(
    registry_uri: str, model_name: str, skip: tuple[Optional[str], ...], metric: str, champion_val: ChampionVal,
    notes: list[str],
) -> Optional[tuple[str, dict[str, Any], str]]:
    """(version, val metrics, basis) of the best intact version by val ``metric``, other than ``skip``."""
    best = None
    for version in registry.list_versions(registry_uri, model_name):
        if version in skip:
            continue
        try:
            val, basis = champion_val(version)
        except CorruptModel as error:
            notes.append(f"{version} skipped for comparison: {error}")
            continue
        if best is None or _metric_key(val, metric) > _metric_key(best[1], metric):
            best = (version, val, basis)
    return best


def champion_to_beat(
    registry_uri: str, model_name: str, challenger: Optional[str], metric: str, champion_val: ChampionVal
) -> Rival:
    """The version to compare ``challenger`` with, and the champion alias as read.

    The alias target when it is intact; otherwise (alias missing, broken or corrupt) the best
    intact registered version by val ``metric`` stands in for it, so that a lost alias
    never lets a worse model through as "the first model".
    """
    target, token = registry.read_alias(registry_uri, model_name, CHAMPION)
    notes: list[str] = []
    if target is not None and target == challenger:  # already champion: nothing to compare
        return Rival(target, token)
    if target is not None:
        try:
            if not registry.version_exists(registry_uri, model_name, target):
                raise BrokenAlias(registry.broken_alias_message(model_name, CHAMPION, str(target)))
            val, basis = champion_val(target)
            return Rival(target, token, target, val, basis)
        except BrokenAlias as error:
            notes.append(f"{error}: ignored")
        except CorruptModel as error:
            notes.append(f"champion {target} skipped for comparison: {error}")
    best = _best_standing_in(registry_uri, model_name, (challenger, target), metric, champion_val, notes)
    if target is None and best is not None:
        notes.insert(0, f"alias {CHAMPION} of {model_name} is missing although versions exist")
    if best is None:
        return Rival(target, token, notes=tuple(notes))
    version, val, basis = best
    return Rival(target, token, version, val, f"{basis}; best registered version by val {metric}, standing in for the champion", tuple(notes))


def _decide(rival: Rival, version: str, challenger_val: dict[str, Any], metric: str, force: bool, reason: str) -> Decision:
    decision = compare(metric, challenger_val, rival.version, rival.val, rival.basis, rival.notes)
    if rival.alias_target == version:
        return dataclasses.replace(decision, promoted=True, reason=f"{version} is already champion")
    if force:
        return dataclasses.replace(decision, promoted=True, reason=f"promoted by hand: {reason}" if reason else "promoted by hand")
    return decision


def promote(
    registry_uri: str,
    model_name: str,
    version: str,
    challenger_val: dict[str, Any],
    metric: str,
    *,
    champion_val: Optional[ChampionVal] = None,
    force: bool = False,
    reason: str = "",
    logger: Any = None,
    max_attempts: int = 50,
) -> Promotion:
    """Make ``version`` champion if its val ``metric`` beats the champion's; return how it ended.

    A compare-and-swap in a loop: the champion alias is read with its token, the challenger
    is compared with it, and the alias is replaced only if it still holds that token. If
    another run moved it meanwhile, the challenger is compared again with the new champion.
    ``champion_val(version)`` gives a version's val metrics and their basis (default: its
    card); it must raise CorruptModel for a damaged model, which is then skipped with a
    warning. ``force`` promotes without comparing (a promotion by hand, for ``reason``), still
    atomically. Every move is kept in the alias history: automatic or by hand, and why.
    The outcome is also kept as the version's promotion.json.
    """
    logger = logger or log
    validate_champion_metric(metric)
    registry.require_aliasable(registry_uri, model_name, version)  # before any comparison
    # Each version scored once, however many attempts (a corrupt one raises each time: not kept).
    scored = functools.cache(champion_val or (lambda v: champion_val_metrics(registry_uri, model_name, v, None)))
    conflicts: list[str] = []
    for attempt in range(1, max_attempts + 1):
        rival = champion_to_beat(registry_uri, model_name, version, metric, scored)
        for note in rival.notes:
            logger.warning(note)
        decision = _decide(rival, version, challenger_val, metric, force, reason)
        if decision.promoted and rival.alias_target != version:
            try:
                registry.swap_alias(
                    registry_uri, model_name, CHAMPION, version, rival.token, previous=rival.alias_target,
                    how="by hand" if force else "automatic", reason=decision.reason,
                )
            except storage.Conflict:
                conflicts.append(f"the champion moved away from {rival.alias_target or 'unset'} before {version} could replace it")
                logger.info("%s %s: %s; comparing again", model_name, version, conflicts[-1])
                continue
        if conflicts and not decision.promoted:
            decision = dataclasses.replace(decision, reason=f"{rival.version} became champion meanwhile; {decision.reason}")
        outcome = Promotion(**vars(decision), attempts=attempt, conflicts=tuple(conflicts),
                            decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        registry.write_promotion(registry_uri, model_name, version, outcome.to_json())
        return outcome
    raise RuntimeError(
        f"could not promote {model_name} {version} in {registry_uri}: the champion moved {max_attempts} times in a row"
    )
