"""Model registry on a local folder or an ``s3://`` prefix.

Layout::

    {registry}/{model_name}/v0001/model.pt     a state_dict (torch.save)
    {registry}/{model_name}/v0001/card.json    metrics, config, provenance
    {registry}/{model_name}/aliases/champion.json   {"version": "v0001", ...}

``card.json`` is written last, create-if-absent: a version exists if and only if its card
does. Both files of a version are written create-if-absent, so a version number is
claimed by exactly one writer and a version is never overwritten, even when several
runs register at the same time.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, Literal, Optional, get_args

import torch
from pydantic import BaseModel, ConfigDict

import pneumo
from pneumo import export, storage
from pneumo.model import TinyNet, keras_parameter_count

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^v(\d{4,})$")
# A version folder under a model: ".../v0003/<file>", with either separator.
_VERSION_FILE = re.compile(r"[/\\](v\d{4,})[/\\](model\.pt|card\.json)$")
MAX_ATTEMPTS = 100  # version numbers tried by one register() before giving up


def validate_model_name(name: str, what: str = "model name") -> str:
    """Refuse names that could escape the registry or clash on case-insensitive stores."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


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


def register(registry: str, model_name: str, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> str:
    """Store a new version and return its name, e.g. "v0003".

    The number after the highest one in use is claimed by creating its model.pt; if another
    writer got there first, the next number is tried. Numbers left by a crashed run (a
    model.pt without a card) are skipped, never reused.
    """
    if not isinstance(card, dict):
        raise ValueError(f"card must be a dict, got {type(card).__name__}")
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    weights = buffer.getvalue()

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    full_card = {"created_at": created, **card, "model_name": model_name}
    onnx_model = export.add_onnx(full_card, state_dict)  # model.onnx beside model.pt, or why not
    json.dumps(full_card)  # a card that cannot be written must fail before a number is claimed

    numbers = [int(v[1:]) for v, _ in _version_files(registry, model_name)]
    number = max(numbers, default=0) + 1
    for _ in range(MAX_ATTEMPTS):
        version = _version_name(number)
        folder = storage.join(_model_root(registry, model_name), version)
        try:
            storage.write_bytes(storage.join(folder, "model.pt"), weights, if_absent=True)
            if onnx_model is not None:
                storage.write_bytes(storage.join(folder, "model.onnx"), onnx_model, if_absent=True)
            storage.write_json(storage.join(folder, "card.json"), {**full_card, "version": version}, if_absent=True)
            return version
        except storage.AlreadyExists:
            number += 1
    raise RuntimeError(
        f"could not register {model_name!r} in {registry}: {MAX_ATTEMPTS} version numbers in a row were taken"
    )


def _alias_uri(registry: str, model_name: str, alias: str) -> str:
    alias = validate_model_name(alias, what="alias")
    return storage.join(_model_root(registry, model_name), "aliases", f"{alias}.json")


def set_alias(registry: str, model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` (e.g. "champion") at an existing version, replacing its old target."""
    version = _check_version(version)
    if not storage.exists(_card_uri(registry, model_name, version)):
        raise FileNotFoundError(f"cannot alias {model_name} {version} in {registry}: that version does not exist")
    pointer = {
        "model_name": model_name,
        "alias": alias,
        "version": version,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(_alias_uri(registry, model_name, alias), pointer)


def get_alias(registry: str, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias is not set."""
    try:
        return storage.read_json(_alias_uri(registry, model_name, alias))["version"]
    except FileNotFoundError:
        return None


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


def load_state_dict(registry: str, model_name: str, version: str) -> dict[str, torch.Tensor]:
    """The weights of a committed version (``version`` may be an alias), loaded with weights_only."""
    version = resolve(registry, model_name, version)
    load_card(registry, model_name, version)  # refuses uncommitted versions
    uri = storage.join(_model_root(registry, model_name), version, "model.pt")
    with storage.local_copy(uri) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def load_model(registry: str, model_name: str, version: str) -> TinyNet:
    """A TinyNet with the version's weights, in eval mode, ready for predict_proba."""
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
    champion_comparison: Optional[dict[str, Any]] = None


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
) -> dict[str, Any]:
    """The card of a new version; ``register`` adds ``model_name`` and ``version``.

    ``champion_comparison`` is the output of ``compare``: how the new model fared against
    the champion when it was registered.
    """
    model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
    model.load_state_dict(state_dict)
    return {
        "n_parameters": keras_parameter_count(model),
        "metrics": metrics,
        "training": training,
        "config": config,
        "data": {"manifest_digest": manifest_digest, "shards_digest": shards_digest, "counts": counts},
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "champion_comparison": champion_comparison,
    }


# --- Champion / challenger --------------------------------------------------------------

CHAMPION = "champion"
# Validation metrics a champion can be chosen on; for each of them, higher is better.
ChampionMetric = Literal["roc_auc", "accuracy", "f1", "precision", "recall", "specificity"]
CHAMPION_METRICS: tuple[str, ...] = get_args(ChampionMetric)


def validate_champion_metric(metric: str) -> str:
    if metric not in CHAMPION_METRICS:
        raise ValueError(f"invalid champion metric {metric!r}: choose one of {', '.join(CHAMPION_METRICS)}")
    return metric


def champion_val_metrics(registry: str, model_name: str, version: str, index_uri: str) -> tuple[dict[str, Any], str]:
    """The champion's validation metrics, and where they come from.

    When the champion was trained on features of the same transform, it is scored again
    on this run's val split, so that both models are judged on the same images: new data
    also brings new val patients, and val figures from two different val sets do not
    compare. Otherwise its features are not comparable and its card's figures are used.
    """
    from pneumo import evaluate, shards, train

    card = load_card(registry, model_name, version)
    if card.get("config", {}).get("transform") != shards.index_config(index_uri)["transform"]:
        return card["metrics"]["val"], "champion's card (trained on a different transform)"
    val = shards.load_split(index_uri, "val")
    threshold = card["config"]["train"]["threshold"]
    probs = train.predict_proba(load_state_dict(registry, model_name, version), val.features)
    return evaluate.metrics(val.labels, probs, threshold), "re-scored on this run's val split"


def compare(
    metric: str,
    challenger_val: dict[str, Any],
    champion_version: str | None,
    champion_val: dict[str, Any] | None,
    basis: str | None = None,
) -> dict[str, Any]:
    """The champion/challenger decision, as recorded in the challenger's card.

    The first model becomes champion. After that the challenger is promoted only when its
    validation ``metric`` is strictly greater than the champion's: a tie keeps the
    champion. A metric that could not be computed (ROC AUC of a one-class val split)
    loses to any number and never wins against a champion.
    """
    validate_champion_metric(metric)
    challenger = challenger_val.get(metric)
    champion = None if champion_val is None else champion_val.get(metric)
    if champion_version is None:
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
    }


def promote_if_better(registry: str, model_name: str, version: str, comparison: dict[str, Any]) -> bool:
    """Point the champion alias at ``version`` if the comparison promoted it; True if it is champion.

    The alias moves only while the champion is still the one the challenger was compared
    with: a run that overlapped with another promotion, or a cached result replayed after
    the champion has moved on, changes nothing. Idempotent, so a retried task is harmless.
    """
    current = get_alias(registry, model_name, CHAMPION)
    if current == version:
        return True
    if comparison["promoted"] and current == comparison["champion_version"]:
        set_alias(registry, model_name, CHAMPION, version)
        return True
    return False
