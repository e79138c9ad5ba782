"""Model registry on a local folder or an ``s3://`` prefix.

Layout::

    {registry}/{model_name}/v0001/model.pt     a state_dict (torch.save)
    {registry}/{model_name}/v0001/card.json    metrics, config, provenance
    {registry}/{model_name}/v0001/promotion.json   how its champion promotion ended
    {registry}/{model_name}/aliases/champion.json   {"version": "v0001", ...}

``card.json`` is written last, create-if-absent: a version exists if and only if its card
does. Both files of a version are written create-if-absent, so a version number is
claimed by exactly one writer and a version is never overwritten, even when several
runs register at the same time. The card records the sha256 of every file of its version,
checked on every load. ``champion`` moves by compare-and-swap (``promote``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel, ConfigDict

import pneumo
from pneumo import export, storage

if TYPE_CHECKING:  # torch is imported where weights are read or written: reading cards and aliases
    import torch  # (pneumo predict with model.onnx) must not pay seconds for it

    from pneumo.model import TinyNet
from pneumo.names import CHAMPION_METRICS, ChampionMetric, validate_model_name  # noqa: F401 (re-exported)

_VERSION = re.compile(r"^v(\d{4,})$")
# A version folder under a model: ".../v0003/<file>", with either separator.
_VERSION_FILE = re.compile(r"[/\\](v\d{4,})[/\\](model\.pt|card\.json)$")
MAX_ATTEMPTS = 100  # version numbers tried by one register() before giving up
SCHEMA_VERSION = 2
LABELS = {"0": "NORMAL", "1": "PNEUMONIA"}
CONFUSION_MATRIX_LAYOUT = "[[tn, fp], [fn, tp]]: rows = truth (NORMAL, PNEUMONIA), columns = prediction"

log = logging.getLogger(__name__)


class CorruptModel(ValueError):
    """A version's model file does not match its card (hash, size or TinyNet shape) or cannot be read."""


class BrokenAlias(FileNotFoundError):
    """An alias names a version that does not exist."""


def _version_name(number: int) -> str:
    return f"v{number:04d}"


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"invalid version {version!r}: expected 'v' and at least 4 digits, e.g. 'v0003'")
    return version


def _model_root(registry: str, model_name: str) -> str:
    return storage.join(registry, validate_model_name(model_name))


def _version_files(registry: str, model_name: str) -> list[tuple[str, str]]:
    """(version, file name) of every model.pt and card.json under the model."""
    found = []
    for uri in storage.list_uris(_model_root(registry, model_name)):
        match = _VERSION_FILE.search(uri)
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def list_versions(registry: str, model_name: str) -> list[str]:
    """Committed versions (those with a card), oldest first."""
    versions = {version for version, name in _version_files(registry, model_name) if name == "card.json"}
    return sorted(versions, key=lambda v: int(v[1:]))


def file_entry(data: bytes) -> dict[str, Any]:
    """What a card records of one file of its version, checked when the file is loaded."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def register(
    registry: str,
    model_name: str,
    state_dict: dict[str, torch.Tensor],
    card: dict[str, Any],
    extra_files: Optional[dict[str, bytes]] = None,
    render_files: Optional[Callable[[dict[str, Any]], dict[str, bytes]]] = None,
) -> str:
    """Store a new version and return its name, e.g. "v0003".

    The number after the highest one in use is claimed by creating its model.pt; if another
    writer got there first, the next number is tried. Numbers left by a crashed run (a
    model.pt without a card) are skipped, never reused. ``extra_files`` (e.g.
    ``{"model.onnx": data}``) are written beside model.pt, before the card; the card's
    ``files`` records the sha256 and size of each. ``render_files(card)`` makes files from
    the card as it will be written (its version and ``files`` known, e.g. ``report.html``);
    they are written last before the card and listed in its ``files`` too.
    """
    if not isinstance(card, dict):
        raise ValueError(f"card must be a dict, got {type(card).__name__}")
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    weights = buffer.getvalue()
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in ("model.pt", "card.json", "promotion.json"):
            raise ValueError(f"extra file {name!r} would replace a file the registry writes itself")
        validate_model_name(name, what="file name")

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    card = dict(card)
    if "model.onnx" not in extra_files:
        onnx_model = export.add_onnx(card, state_dict)  # model.onnx beside model.pt, or why not
        if onnx_model is not None:
            extra_files["model.onnx"] = onnx_model
    files = {"model.pt": file_entry(weights), **{name: file_entry(data) for name, data in extra_files.items()}}
    full_card = {"created_at": created, **card, "files": {**card.get("files", {}), **files}, "model_name": model_name}
    json.dumps(full_card)  # a card that cannot be written must fail before a number is claimed

    numbers = [int(v[1:]) for v, _ in _version_files(registry, model_name)]
    number = max(numbers, default=0) + 1
    for _ in range(MAX_ATTEMPTS):
        version = _version_name(number)
        folder = storage.join(_model_root(registry, model_name), version)
        try:
            storage.write_bytes(storage.join(folder, "model.pt"), weights, if_absent=True)
            for name, data in extra_files.items():
                storage.write_bytes(storage.join(folder, name), data, if_absent=True)
            final_card = {**full_card, "version": version}
            rendered = render_files(final_card) if render_files else {}
            if set(rendered) & set(final_card["files"]) or set(rendered) & {"card.json", "promotion.json"}:
                raise ValueError(f"rendered files {sorted(rendered)} would replace files of the version")
            for name, data in rendered.items():
                storage.write_bytes(storage.join(folder, name), data, if_absent=True)
            final_card["files"] = {**final_card["files"], **{name: file_entry(data) for name, data in rendered.items()}}
            storage.write_json(storage.join(folder, "card.json"), final_card, if_absent=True)
            return version
        except storage.AlreadyExists:
            number += 1
    raise RuntimeError(
        f"could not register {model_name!r} in {registry}: {MAX_ATTEMPTS} version numbers in a row were taken"
    )


def _alias_uri(registry: str, model_name: str, alias: str) -> str:
    alias = validate_model_name(alias, what="alias")
    return storage.join(_model_root(registry, model_name), "aliases", f"{alias}.json")


def _alias_pointer(registry: str, model_name: str, alias: str, version: str) -> bytes:
    version = _check_version(version)
    if not storage.exists(_card_uri(registry, model_name, version)):
        raise FileNotFoundError(f"cannot alias {model_name} {version} in {registry}: that version does not exist")
    pointer = {
        "model_name": model_name,
        "alias": alias,
        "version": version,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"


def set_alias(registry: str, model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` (e.g. "latest") at an existing version, replacing its old target.

    Unconditional: use ``promote`` for ``champion``, which must not overwrite a concurrent move.
    """
    storage.write_bytes(_alias_uri(registry, model_name, alias), _alias_pointer(registry, model_name, alias, version))


def read_alias(registry: str, model_name: str, alias: str) -> tuple[str | None, str | None]:
    """The version ``alias`` names (unchecked; None when unset) and the token to swap it with."""
    data, token = storage.read_with_token(_alias_uri(registry, model_name, alias))
    return (None if data is None else json.loads(data)["version"]), token


def broken_alias_message(model_name: str, alias: str, version: str) -> str:
    return f"alias {alias} of {model_name} points at {version}, which does not exist"


def get_alias(registry: str, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias is not set.

    Raises BrokenAlias when the alias names a version that does not exist.
    """
    try:
        version = storage.read_json(_alias_uri(registry, model_name, alias))["version"]
    except FileNotFoundError:
        return None
    if not (isinstance(version, str) and _VERSION.match(version)) or not storage.exists(
        _card_uri(registry, model_name, version)
    ):
        raise BrokenAlias(f"{broken_alias_message(model_name, alias, str(version))} (in {registry})")
    return version


def describe_alias(registry: str, model_name: str, alias: str) -> str:
    """For summaries: the version, "not set", or "broken: <why>"; never raises on a broken alias."""
    try:
        return get_alias(registry, model_name, alias) or "not set"
    except BrokenAlias as error:
        return f"broken: {error}"


def resolve(registry: str, model_name: str, version_or_alias: str) -> str:
    """A version name from either a version ("v0003") or an alias ("champion")."""
    if isinstance(version_or_alias, str) and _VERSION.match(version_or_alias):
        return version_or_alias
    version = get_alias(registry, model_name, version_or_alias)
    if version is None:
        raise FileNotFoundError(f"{model_name} in {registry} has no version or alias named {version_or_alias!r}")
    return version


def _card_uri(registry: str, model_name: str, version: str) -> str:
    return storage.join(_model_root(registry, model_name), _check_version(version), "card.json")


def load_card(registry: str, model_name: str, version: str) -> dict[str, Any]:
    """The card of a version; ``version`` may also be an alias."""
    uri = _card_uri(registry, model_name, resolve(registry, model_name, version))
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no version {version!r} of {model_name} in {registry} ({uri} is missing)") from None


def _expected_n_features(card: dict[str, Any], state_dict: dict[str, Any]) -> int | None:
    transform = card.get("config", {}).get("transform")
    if transform:
        # Every part counts: the robust recipe pools max and mean, 2 x 70 features.
        grid = transform.get("grid", (0, 0))
        return int(grid[0]) * int(grid[1]) * len(transform.get("pooling", ("max",)))
    weight = state_dict.get("hidden1.weight")  # cards without a transform: trust the first layer's width
    return int(weight.shape[1]) if hasattr(weight, "shape") and len(weight.shape) == 2 else None


def _check_tinynet_shapes(state_dict: Any, n_features: int | None) -> str | None:
    """What is wrong with ``state_dict`` as the weights of a TinyNet(n_features), or None."""
    import torch

    from pneumo.model import TinyNet

    if not isinstance(state_dict, dict) or n_features is None:
        return "not a TinyNet state_dict"
    expected = {k: tuple(v.shape) for k, v in TinyNet(n_features=n_features).state_dict().items()}
    actual = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state_dict.items()}
    if actual == expected:
        return None
    missing, unexpected = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    wrong = [f"{k} {actual[k]} instead of {expected[k]}" for k in expected if k in actual and actual[k] != expected[k]]
    parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "", ", ".join(wrong)]
    return f"not the weights of a TinyNet with {n_features} features: " + "; ".join(p for p in parts if p)


def load_state_dict(registry: str, model_name: str, version: str) -> dict[str, torch.Tensor]:
    """The weights of a committed version (``version`` may be an alias), loaded with weights_only.

    Raises CorruptModel when model.pt does not have the sha256 and size its card recorded,
    cannot be read, or is not a TinyNet for the card's feature count.
    """
    version = resolve(registry, model_name, version)
    card = load_card(registry, model_name, version)  # refuses uncommitted versions
    uri = storage.join(_model_root(registry, model_name), version, "model.pt")
    data = storage.read_bytes(uri)
    where = f"{model_name} {version}: {uri}"
    expected = card.get("files", {}).get("model.pt")
    if expected is not None:
        actual = file_entry(data)
        if actual != {k: expected.get(k) for k in actual}:
            raise CorruptModel(
                f"{where} is corrupt: expected sha256 {expected.get('sha256')} ({expected.get('bytes')} bytes), "
                f"found sha256 {actual['sha256']} ({actual['bytes']} bytes)"
            )
    import torch

    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle weights_only refuses, ...
        raise CorruptModel(f"{where} cannot be read as a state_dict: {type(error).__name__}: {error}") from error
    problem = _check_tinynet_shapes(state_dict, _expected_n_features(card, state_dict if isinstance(state_dict, dict) else {}))
    if problem:
        raise CorruptModel(f"{where} is {problem}")
    return state_dict


def load_model(registry: str, model_name: str, version: str) -> TinyNet:
    """A TinyNet with the version's weights, in eval mode, ready for predict_proba."""
    from pneumo.model import TinyNet

    state_dict = load_state_dict(registry, model_name, version)
    model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
    model.load_state_dict(state_dict)
    return model.eval()


class ModelRef(BaseModel):
    """A registered version: where its files are and how it scored."""

    model_config = ConfigDict(frozen=True)

    registry: str
    model_name: str
    version: str
    card_uri: str
    model_uri: str
    metrics: dict[str, dict[str, Any]]
    champion_comparison: Optional[dict[str, Any]] = None  # the decision recorded in the card
    promotion: Optional[dict[str, Any]] = None  # how the promotion ended (promotion.json)


def read_promotion(registry: str, model_name: str, version: str) -> dict[str, Any] | None:
    """How the champion promotion of ``version`` ended, or None when it was never attempted."""
    try:
        return storage.read_json(storage.join(_model_root(registry, model_name), _check_version(version), "promotion.json"))
    except FileNotFoundError:
        return None


def model_ref(registry: str, model_name: str, version: str) -> ModelRef:
    folder = storage.join(_model_root(registry, model_name), version)
    card = load_card(registry, model_name, version)
    return ModelRef(
        registry=registry,
        model_name=model_name,
        version=version,
        card_uri=storage.join(folder, "card.json"),
        model_uri=storage.join(folder, "model.pt"),
        metrics=card["metrics"],
        champion_comparison=card.get("champion_comparison"),
        promotion=read_promotion(registry, model_name, version),
    )


def code_version() -> str:
    """The package version plus a digest of the library source that produced a model."""
    digest = hashlib.sha256()
    for path in sorted(Path(pneumo.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return f"{pneumo.__version__}+{digest.hexdigest()[:12]}"


def build_card(
    *,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, dict[str, Any]],
    training: dict[str, Any],
    config: dict[str, Any],
    manifest_digest: str,
    shards_digest: str,
    counts: dict[str, dict[str, int]],
    champion_comparison: Optional[dict[str, Any]] = None,
    **extra: Any,
) -> dict[str, Any]:
    """The card of a new version; ``register`` adds ``model_name``, ``version`` and ``files``.

    ``extra`` adds top-level keys (threshold, labels, plots, ...: ``Evaluation.card_fields``).

    ``champion_comparison`` is the output of ``compare``: how the new model fared against
    the champion when it was registered. ``extra`` keys (e.g. ``recipe``) are added as they
    are. ``threshold`` is the one of ``config["train"]``, used for every metric.
    """
    from pneumo.model import TinyNet, keras_parameter_count

    model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
    model.load_state_dict(state_dict)
    return {
        "schema_version": SCHEMA_VERSION,
        "labels": LABELS,
        "confusion_matrix_layout": CONFUSION_MATRIX_LAYOUT,
        "threshold": config.get("train", {}).get("threshold"),
        "n_parameters": keras_parameter_count(model),
        "metrics": metrics,
        "training": training,
        "config": config,
        "data": {"manifest_digest": manifest_digest, "shards_digest": shards_digest, "counts": counts},
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "champion_comparison": champion_comparison,
        **extra,
    }


# --- Champion / challenger --------------------------------------------------------------

CHAMPION = "champion"


def validate_champion_metric(metric: str) -> str:
    if metric not in CHAMPION_METRICS:
        raise ValueError(f"invalid champion metric {metric!r}: choose one of {', '.join(CHAMPION_METRICS)}")
    return metric


def champion_val_metrics(
    registry: str, model_name: str, version: str, index_uri: Optional[str]
) -> tuple[dict[str, Any], str]:
    """The champion's validation metrics, and where they come from.

    When the champion was trained on features of the same transform, it is scored again
    on this run's val split, so that both models are judged on the same images: new data
    also brings new val patients, and val figures from two different val sets do not
    compare. Otherwise (or without ``index_uri``) its features are not comparable and its
    card's figures are used. Its model file is verified either way (CorruptModel).
    """
    from pneumo import evaluate, shard_files, train

    card = load_card(registry, model_name, version)
    state_dict = load_state_dict(registry, model_name, version)  # a corrupt champion is never compared
    if index_uri is None:
        return card["metrics"]["val"], "champion's card"
    if card.get("config", {}).get("transform") != shard_files.index_config(index_uri)["transform"]:
        return card["metrics"]["val"], "champion's card (trained on a different transform)"
    val = shard_files.load_split(index_uri, "val")
    threshold = card["config"]["train"]["threshold"]
    probs = train.predict_proba(state_dict, val.features)
    return evaluate.metrics(val.labels, probs, threshold), "re-scored on this run's val split"


def compare(
    metric: str,
    challenger_val: dict[str, Any],
    champion_version: str | None,
    champion_val: dict[str, Any] | None,
    basis: str | None = None,
    notes: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
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
        promoted, reason = False, f"challenger has no val {metric}"
    elif champion is None:
        promoted, reason = True, f"champion {champion_version} has no val {metric}"
    elif challenger > champion:
        promoted, reason = True, f"val {metric} {challenger:.4f} > {champion:.4f}"
    else:
        promoted, reason = False, f"val {metric} {challenger:.4f} does not beat {champion:.4f}"
    return {
        "metric": metric,
        "split": "val",
        "challenger_value": challenger,
        "champion_version": champion_version,
        "champion_value": champion,
        "basis": basis,
        "promoted": promoted,
        "reason": reason,
        "notes": list(notes),
    }


# version -> (its val metrics, where they come from); raises CorruptModel for a damaged model
ChampionVal = Callable[[str], tuple[dict[str, Any], str]]


def _metric_key(val: Optional[dict[str, Any]], metric: str) -> float:
    value = (val or {}).get(metric)
    return float("-inf") if value is None else float(value)


def champion_to_beat(
    registry: str, model_name: str, challenger: Optional[str], metric: str, champion_val: ChampionVal
) -> tuple[Optional[str], Optional[str], Optional[str], Optional[dict[str, Any]], Optional[str], list[str]]:
    """(alias target, alias token, version to compare with, its val metrics, their basis, notes).

    The alias target when it is intact; otherwise (alias missing, broken or corrupt) the best
    intact registered version by val ``metric`` stands in for it, so that a lost alias
    never lets a worse model through as "the first model".
    """
    target, token = read_alias(registry, model_name, CHAMPION)
    notes: list[str] = []
    if target is not None and target == challenger:  # already champion: nothing to compare
        return target, token, None, None, None, notes
    if target is not None:
        try:
            if not (isinstance(target, str) and _VERSION.match(target)) or not storage.exists(
                _card_uri(registry, model_name, target)
            ):
                raise BrokenAlias(broken_alias_message(model_name, CHAMPION, str(target)))
            val, basis = champion_val(target)
            return target, token, target, val, basis, notes
        except BrokenAlias as error:
            notes.append(f"{error}: ignored")
        except CorruptModel as error:
            notes.append(f"champion {target} skipped for comparison: {error}")
    best = None
    for version in list_versions(registry, model_name):
        if version in (challenger, target):
            continue
        try:
            val, basis = champion_val(version)
        except CorruptModel as error:
            notes.append(f"{version} skipped for comparison: {error}")
            continue
        if best is None or _metric_key(val, metric) > _metric_key(best[1], metric):
            best = (version, val, basis)
    if target is None and best is not None:
        notes.insert(0, f"alias {CHAMPION} of {model_name} is missing although versions exist")
    if best is None:
        return target, token, None, None, None, notes
    return target, token, best[0], best[1], f"{best[2]}; best registered version by val {metric}, standing in for the champion", notes


def promote(
    registry: str,
    model_name: str,
    version: str,
    challenger_val: dict[str, Any],
    metric: str,
    *,
    champion_val: Optional[ChampionVal] = None,
    force: bool = False,
    logger: Any = None,
    max_attempts: int = 50,
) -> dict[str, Any]:
    """Make ``version`` champion if its val ``metric`` beats the champion's; return the outcome.

    A compare-and-swap in a loop: the champion alias is read with its token, the challenger
    is compared with it, and the alias is replaced only if it still holds that token. If
    another run moved it meanwhile, the challenger is compared again with the new champion.
    ``champion_val(version)`` gives a version's val metrics and their basis (default: its
    card); it must raise CorruptModel for a damaged model, which is then skipped with a
    warning. ``force`` promotes without comparing (a promotion by hand), still atomically.

    The outcome is ``compare``'s dict plus ``is_champion``, ``attempts``, ``conflicts`` and
    ``notes``; it is also kept as the version's promotion.json.
    """
    logger = logger or log
    validate_champion_metric(metric)
    uri = _alias_uri(registry, model_name, CHAMPION)
    pointer = _alias_pointer(registry, model_name, CHAMPION, version)
    champion_val = champion_val or (lambda v: champion_val_metrics(registry, model_name, v, None))
    scores: dict[str, tuple[dict[str, Any], str]] = {}

    def scored(v: str) -> tuple[dict[str, Any], str]:  # each version once, however many attempts
        if v not in scores:
            scores[v] = champion_val(v)
        return scores[v]

    conflicts: list[str] = []
    for attempt in range(1, max_attempts + 1):
        target, token, champion, champion_vals, basis, notes = champion_to_beat(
            registry, model_name, version, metric, scored
        )
        for note in notes:
            logger.warning(note)
        comparison = compare(metric, challenger_val, champion, champion_vals, basis, notes)
        if target == version:
            comparison.update(promoted=True, reason=f"{version} is already champion")
        elif force:
            comparison.update(promoted=True, reason="promoted by hand")
        if comparison["promoted"] and target != version:
            try:
                storage.compare_and_swap(uri, pointer, token)
            except storage.Conflict:
                conflicts.append(f"the champion moved away from {target or 'unset'} before {version} could replace it")
                logger.info("%s %s: %s; comparing again", model_name, version, conflicts[-1])
                continue
        if conflicts and not comparison["promoted"]:
            comparison["reason"] = f"{champion} became champion meanwhile; {comparison['reason']}"
        outcome = {**comparison, "is_champion": comparison["promoted"], "attempts": attempt,
                   "conflicts": conflicts,
                   "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        promotion_uri = storage.join(_model_root(registry, model_name), version, "promotion.json")
        try:
            storage.write_json(promotion_uri, outcome, if_absent=True)
        except storage.AlreadyExists:  # a retried or repeated promotion: the first outcome stays
            pass
        return outcome
    raise RuntimeError(
        f"could not promote {model_name} {version} in {registry}: the champion moved {max_attempts} times in a row"
    )
