"""Model registry on a local folder or an ``s3://`` prefix.

Layout::

    {registry}/{model_name}/v0001/model.pt     a state_dict (torch.save)
    {registry}/{model_name}/v0001/card.json    metrics, config, provenance
    {registry}/{model_name}/v0001/promotion.json   how its champion promotion ended
    {registry}/{model_name}/aliases/champion.json   {"version": "v0001", ...}
    {registry}/{model_name}/alias-history/champion/{time}-{version}-{id}.json   one alias move each

Only a folder named ``v`` and at least four digits directly under the model is a version.
``card.json`` is written last, create-if-absent: a version exists if and only if its card
does. Both files of a version are written create-if-absent, so a version number is
claimed by exactly one writer and a version is never overwritten, even when several
runs register at the same time.

Nothing read back is trusted. The card records the sha256 of every file of its version and
its own digest (``integrity.card_sha256``, over every other field of the card, whatever
fields a later pneumo adds); with ``PNEUMO_REGISTRY_KEY`` set, also an HMAC of the same bytes
under that key, which lives outside the registry. Every load refuses links, checks the JSON,
the digest (and the HMAC when the key is set) and the card's schema, and raises CorruptCard
(a CorruptModel) naming the file. ``champion`` moves by compare-and-swap (``swap_alias``);
every alias move is also kept as an object of its own (who, when, how, why). Which version
deserves ``champion`` is decided in pneumo.promotion, not here: the registry stores, it does
not score.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import hmac
import io
import json
import logging
import os
import re
import socket
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Optional, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, ValidationError, field_validator

import pneumo
from pneumo import storage
from pneumo.config import TransformConfig
from pneumo.labels import CONFUSION_MATRIX_LAYOUT, LABELS
from pneumo.names import printable, validate_model_name

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where weights are read or written: reading cards and aliases
    import torch  # (pneumo predict with model.onnx) must not pay seconds for it

    from pneumo.model import TinyNet

_VERSION = re.compile(r"^v(\d{4,})$")  # always fullmatch: with match, "v0001\n" passes
VERSION_FILES = ("model.pt", "card.json")  # the files that claim a version number
MAX_ATTEMPTS = 100  # version numbers tried by one register() before giving up
# The layout of card.json (not the shards': shard_files.SHARD_SCHEMA_VERSION). ``integrity``
# was added without a new number (older readers ignore it); loading requires it all the same.
CARD_SCHEMA_VERSION = 2
CHAMPION = "champion"  # the alias pneumo.promotion moves
# torch and the model are imported inside the functions that load or save weights: listing
# versions and reading cards and aliases (every run's summary) then costs no torch import.
INTEGRITY = "integrity"  # the one card field its digest does not cover: it holds the digest
KEY_ENV = "PNEUMO_REGISTRY_KEY"  # an HMAC key kept outside the registry; never logged


class CorruptModel(ValueError):
    """A version that cannot be trusted: its model file does not match its card (hash, size or
    TinyNet shape) or cannot be read, or its card is unreadable, edited, invalid or a link."""


class CorruptCard(CorruptModel):
    """A card.json (or its version folder) that fails the checks on load; the message names the file."""


class BrokenAlias(FileNotFoundError):
    """An alias names a version that does not exist."""


class VersionNotFound(FileNotFoundError):
    """No such version or alias; the message names the versions the registry does hold."""


# --- The card's schema ------------------------------------------------------------------------
# Every field a reader uses is typed; fields this pneumo does not know (a later one's additions)
# are allowed, and the digest covers them all the same. The JSON on disk is what is sealed: a
# parsed card keeps it (``as_json``), so that reading a card never changes its bytes.


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class CardConfig(BaseModel):
    """What the version was made with; train and split stay as recorded (their defaults move)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    recipe: Optional[str] = None
    transform: Optional[TransformConfig] = None
    train: Optional[dict[str, Any]] = None
    split: Optional[dict[str, Any]] = None

    @field_validator("transform", mode="before")
    @classmethod
    def _stored(cls, value: Any) -> Any:
        return TransformConfig.stored(value) if isinstance(value, dict) else value


class CardTraining(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    best_epoch: Optional[int] = None
    epochs_run: Optional[int] = None
    stopped_early: Optional[bool] = None
    n_train: Optional[int] = None
    seconds: Optional[float] = None
    history: list[dict[str, Any]] = []
    averaged_from: Optional[int] = None


class CardData(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    manifest_digest: Optional[str] = None
    shards_digest: Optional[str] = None
    counts: Optional[dict[str, dict[str, int]]] = None


class ChampionComparison(BaseModel):
    """The champion/challenger decision as it stood at registration (``promotion.Decision``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    metric: Optional[str] = None
    split: Optional[str] = None
    decided_by: Optional[str] = None
    challenger_value: Optional[float] = None
    champion_version: Optional[str] = None
    champion_value: Optional[float] = None
    basis: Optional[str] = None
    promoted: Optional[bool] = None
    reason: Optional[str] = None
    notes: list[str] = []


class CardContent(BaseModel):
    """What a card may hold; a field that is present must be valid (labels, threshold, transform...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Optional[StrictInt] = Field(None, ge=1)
    model_name: Optional[str] = None
    version: Optional[str] = Field(None, pattern=_VERSION.pattern)
    created_at: Optional[str] = None
    recipe: Optional[str] = None
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False, strict=True)
    threshold_rule: Optional[str] = None
    threshold_choice: Any = None  # older recipes said in words (or a dict) how the threshold was chosen
    labels: Optional[dict[Literal["0", "1"], str]] = None
    confusion_matrix_layout: Optional[str] = None
    n_parameters: Optional[int] = None
    config: Optional[CardConfig] = None
    metrics: dict[str, Optional[dict[str, Any]]] = {}
    training: Optional[CardTraining] = None
    data: Optional[CardData] = None
    code_version: Optional[str] = None
    files: Optional[dict[str, FileEntry]] = None
    export: Optional[dict[str, Any]] = None
    warnings: list[str] = []
    plots: list[str] = []
    champion_comparison: Optional[ChampionComparison] = None

    _json: Optional[dict[str, Any]] = PrivateAttr(None)

    @field_validator("labels")
    @classmethod
    def _both_labels(cls, labels: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if labels is None:
            return labels
        if set(labels) != {"0", "1"}:
            raise ValueError(f"needs a name for each of the labels 0 and 1, got {sorted(labels)}")
        if not all(name.strip() for name in labels.values()) or labels["0"] == labels["1"]:
            raise ValueError(f"the two label names must be distinct and not blank, got {labels}")
        return labels

    @classmethod
    def from_json(cls, card: Any, where: str = "card") -> Self:
        """The card parsed from its JSON object; CorruptCard naming each field that does not fit."""
        if not isinstance(card, dict):
            raise CorruptCard(f"{where}: a card must be a JSON object, got {type(card).__name__}")
        try:
            parsed = cls.model_validate(card)
        except ValidationError as error:
            raise CorruptCard(f"{where} does not fit the card schema: {_schema_problems(error)}") from None
        parsed._json = card
        return parsed

    def as_json(self) -> dict[str, Any]:
        """The card as written (a copy): what its digest covers and ``models show --json`` prints."""
        return copy.deepcopy(self._json) if self._json is not None else self.model_dump(mode="json", exclude_unset=True)

    @property
    def decision_threshold(self) -> Optional[float]:
        """The threshold every metric and prediction used; cards before ``threshold`` kept it in config.train."""
        if self.threshold is not None:
            return self.threshold
        return ((self.config.train if self.config else None) or {}).get("threshold")


class Card(CardContent):
    """A registered card: what ``register`` adds is required."""

    model_name: str
    version: str = Field(pattern=_VERSION.pattern)
    created_at: str
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _weights_listed(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        if "model.pt" not in files:
            raise ValueError("does not list model.pt")
        return files


def _schema_problems(error: ValidationError) -> str:
    return "; ".join(f"field {'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in error.errors())


def check_card_content(card: Any, where: str = "card") -> CardContent:
    """The card's content, parsed; CorruptCard for fields that would fail prediction: labels, threshold, transform, ..."""
    return CardContent.from_json(card, where)


# --- The card's digest ------------------------------------------------------------------------


def canonical_card(card: dict[str, Any]) -> bytes:
    """The bytes the digest covers: every field but ``integrity``, as sorted, compact JSON."""
    return json.dumps({k: v for k, v in card.items() if k != INTEGRITY}, sort_keys=True, separators=(",", ":")).encode()


def registry_key() -> Optional[bytes]:
    """The HMAC key from PNEUMO_REGISTRY_KEY, or None; kept outside the registry on purpose."""
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def seal_card(card: dict[str, Any], key: Optional[bytes] = None) -> dict[str, Any]:
    """The card with its ``integrity`` record: the sha256 of ``canonical_card``, and its HMAC under ``key``."""
    body = canonical_card(card)
    integrity = {"card_sha256": hashlib.sha256(body).hexdigest()}
    if key:
        integrity["hmac_sha256"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    return {**card, INTEGRITY: integrity}


def check_seal(card: dict[str, Any], where: str, key: Optional[bytes] = None) -> None:
    """Refuse (CorruptCard) a card edited since it was sealed, or unsigned/forged when ``key`` is set."""
    integrity = card.get(INTEGRITY)
    if not isinstance(integrity, dict) or not isinstance(integrity.get("card_sha256"), str):
        raise CorruptCard(
            f"{where} has no integrity record (a card of an older pneumo, or one stripped of it): "
            "it cannot be verified; register a new version (pneumo run --retrain)"
        )
    body = canonical_card(card)
    actual = hashlib.sha256(body).hexdigest()
    if not hmac.compare_digest(actual, integrity["card_sha256"]):
        raise CorruptCard(
            f"{where} was edited after registration: its fields digest to sha256 {actual}, "
            f"the card recorded {integrity['card_sha256']}"
        )
    if key:
        signature = integrity.get("hmac_sha256")
        if not isinstance(signature, str):
            raise CorruptCard(f"{where} is not signed with the registry key ({KEY_ENV} is set, the card has no hmac_sha256)")
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest(), signature):
            raise CorruptCard(f"{where} has a wrong HMAC for the registry key ({KEY_ENV}): rewritten or forged")


def _version_name(number: int) -> str:
    return f"v{number:04d}"


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ValueError(f"invalid version {version!r}: expected 'v' and at least 4 digits, e.g. 'v0003'")
    return version


def _model_root(registry: str, model_name: str) -> str:
    return storage.join(registry, validate_model_name(model_name))


def _relative_parts(root: str, uri: str) -> list[str]:
    return uri[len(root):].replace("\\", "/").strip("/").split("/")


def _version_files(registry: str, model_name: str) -> list[tuple[str, str]]:
    """(version, file name) of every {model}/vNNNN/model.pt and card.json, and ("vNNNN", "link")
    for every linked vNNNN folder. Only that exact layout: a version moved aside
    (``archive/v0002/``) is none, and a linked version is seen, so that it is refused by name."""
    root = _model_root(registry, model_name)
    found = []
    for uri in storage.list_uris(root):
        parts = _relative_parts(root, uri)
        if len(parts) == 2 and _VERSION.fullmatch(parts[0]) and parts[1] in VERSION_FILES:
            found.append((parts[0], parts[1]))
    for uri in storage.links_under(root):
        parts = _relative_parts(root, uri)
        if len(parts) == 1 and _VERSION.fullmatch(parts[0]):
            found.append((parts[0], "link"))
    return found


def list_versions(registry: str, model_name: str) -> list[str]:
    """Committed versions (those with a card, and linked version folders, which every load
    refuses by name), oldest first. Reads no card: ``verify_version`` checks one."""
    versions = {version for version, name in _version_files(registry, model_name) if name != "model.pt"}
    return sorted(versions, key=lambda v: int(v[1:]))


def file_entry(data: bytes) -> dict[str, Any]:
    """What a card records of one file of its version, checked when the file is loaded."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    return buffer.getvalue()


def _files_to_write(card: dict[str, Any], state_dict: dict[str, torch.Tensor], extra_files: Optional[dict[str, bytes]]) -> dict[str, bytes]:
    """model.pt, the extra files and model.onnx (or why not, in ``card["export"]``): every file before the card."""
    from pneumo import export

    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in ("model.pt", "card.json", "promotion.json"):
            raise ValueError(f"extra file {name!r} would replace a file the registry writes itself")
        validate_model_name(name, what="file name")
    if "model.onnx" not in extra_files:
        onnx_model = export.add_onnx(card, state_dict)  # model.onnx beside model.pt, or why not
        if onnx_model is not None:
            extra_files["model.onnx"] = onnx_model
    return {"model.pt": _weights_bytes(state_dict), **extra_files}


def _unsealed_card(card: dict[str, Any], model_name: str, files: dict[str, bytes]) -> dict[str, Any]:
    """The card as it will be written, without its version: files listed, checked, JSON round-tripped."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    listed = {name: file_entry(data) for name, data in files.items()}
    full_card = {"created_at": created, **card, "files": {**card.get("files", {}), **listed}, "model_name": model_name}
    full_card.pop(INTEGRITY, None)  # sealed once the version is known
    # A card that cannot be written, or would fail on load, fails before a number is claimed;
    # the round trip makes the sealed fields exactly those a reader will parse back.
    full_card = json.loads(json.dumps(full_card))
    check_card_content(full_card, f"the card of a new {model_name} version")
    return full_card


def _write_version(
    folder: str, version: str, files: dict[str, bytes], card: dict[str, Any],
    render_files: Optional[Callable[[Card], dict[str, bytes]]],
) -> None:
    """Every file of ``version``, create-if-absent, the sealed card last; AlreadyExists if the number is taken."""
    for name, data in files.items():  # model.pt first: it claims the number
        storage.write_bytes(storage.join(folder, name), data, if_absent=True)
    final_card = {**card, "version": version}
    rendered = render_files(Card.from_json(final_card)) if render_files else {}
    if set(rendered) & set(final_card["files"]) or set(rendered) & {"card.json", "promotion.json"}:
        raise ValueError(f"rendered files {sorted(rendered)} would replace files of the version")
    for name, data in rendered.items():
        storage.write_bytes(storage.join(folder, name), data, if_absent=True)
    final_card["files"] = {**final_card["files"], **{name: file_entry(data) for name, data in rendered.items()}}
    sealed = seal_card(final_card, registry_key())  # last: the digest covers every file entry
    storage.write_json(storage.join(folder, "card.json"), sealed, if_absent=True)


def register(
    registry: str,
    model_name: str,
    state_dict: dict[str, torch.Tensor],
    card: dict[str, Any],
    extra_files: Optional[dict[str, bytes]] = None,
    render_files: Optional[Callable[[Card], dict[str, bytes]]] = None,
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
    card = dict(card)
    files = _files_to_write(card, state_dict, extra_files)
    full_card = _unsealed_card(card, model_name, files)
    numbers = [int(v[1:]) for v, _ in _version_files(registry, model_name)]
    number = max(numbers, default=0) + 1
    for _ in range(MAX_ATTEMPTS):
        version = _version_name(number)
        folder = storage.join(_model_root(registry, model_name), version)
        number += 1
        if storage.is_link(folder):  # never write through a link, out of the registry
            continue
        try:
            _write_version(folder, version, files, full_card, render_files)
            return version
        except storage.AlreadyExists:
            continue
    raise RuntimeError(
        f"could not register {model_name!r} in {registry}: {MAX_ATTEMPTS} version numbers in a row were taken"
    )


def _alias_uri(registry: str, model_name: str, alias: str) -> str:
    alias = validate_model_name(alias, what="alias")
    return storage.join(_model_root(registry, model_name), "aliases", f"{alias}.json")


def require_aliasable(registry: str, model_name: str, version: str) -> str:
    """``version`` if an alias may point at it: ValueError for a malformed name, FileNotFoundError
    if not committed, CorruptCard if its card fails the load checks (edited, invalid, a link)."""
    version = _check_version(version)
    if not storage.exists(_card_uri(registry, model_name, version)):
        raise FileNotFoundError(f"cannot alias {model_name} {version} in {registry}: that version does not exist")
    load_card(registry, model_name, version)
    return version


def _alias_pointer(registry: str, model_name: str, alias: str, version: str) -> bytes:
    version = require_aliasable(registry, model_name, version)
    pointer = {
        "model_name": model_name,
        "alias": alias,
        "version": version,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"


AliasMove = Literal["automatic", "by hand"]


def set_alias(
    registry: str, model_name: str, alias: str, version: str, *, how: AliasMove = "automatic", reason: str = ""
) -> None:
    """Point ``alias`` (e.g. "latest") at an existing version, replacing its old target; the
    move is kept in the alias history.

    Unconditional (it repairs a broken alias): use ``promote`` for ``champion``, which must not overwrite a concurrent move.
    """
    previous = read_alias(registry, model_name, alias)
    storage.write_bytes(_alias_uri(registry, model_name, alias), _alias_pointer(registry, model_name, alias, version))
    record_alias_move(registry, model_name, alias, previous.version, version, how=how, reason=reason, repaired=previous.broken)


def swap_alias(
    registry: str, model_name: str, alias: str, version: str, token: str | None,
    *, previous: str | None = None, how: AliasMove = "automatic", reason: str = "", repaired: Optional[str] = None,
) -> None:
    """Point ``alias`` at ``version`` only if it still holds ``token`` (from ``read_alias``, with
    ``previous``, the version it named, and ``repaired``, why it was broken); the move is kept in the alias history.

    Raises storage.Conflict when another writer moved the alias since it was read.
    """
    storage.compare_and_swap(
        _alias_uri(registry, model_name, alias), _alias_pointer(registry, model_name, alias, version), token
    )
    record_alias_move(registry, model_name, alias, previous, version, how=how, reason=reason, repaired=repaired)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def record_alias_move(
    registry: str, model_name: str, alias: str, previous: str | None, version: str, *, how: AliasMove, reason: str,
    repaired: Optional[str] = None,
) -> None:
    """Keep one alias move as an object of its own: created once, never rewritten, so that
    concurrent movers never lose each other's entries (on S3 too). Written after the move:
    a failure to write it is logged and does not undo the move. ``repaired``: why the alias was broken before."""
    at = datetime.now(timezone.utc)
    entry = {"alias": alias, "from": previous, "to": version, "at": at.isoformat(timespec="microseconds"),
             "by": _who(), "how": how, "reason": reason, **({"repaired": repaired} if repaired else {})}
    name = f"{at.strftime('%Y%m%dT%H%M%S%fZ')}-{version}-{uuid.uuid4().hex[:8]}.json"
    uri = storage.join(_model_root(registry, model_name), "alias-history", validate_model_name(alias, what="alias"), name)
    try:
        storage.write_json(uri, entry, if_absent=True)
    except (OSError, storage.S3Error) as error:
        log.warning("%s %s moved to %s, but its history entry %s could not be written: %s", model_name, alias, version, uri, error)


def alias_history(registry: str, model_name: str, alias: str) -> list[dict[str, Any]]:
    """The moves of ``alias``, oldest first; an unreadable entry is kept as {"error": ...} naming its file."""
    root = storage.join(_model_root(registry, model_name), "alias-history", validate_model_name(alias, what="alias"))
    moves = []
    for uri in storage.list_uris(root):
        if storage.is_link(uri):
            moves.append({"error": f"{uri} is a symbolic link: refused"})
            continue
        try:
            entry = storage.read_json(uri)
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}, not an object")
            moves.append(entry)
        except ValueError as error:
            moves.append({"error": f"{uri} is unreadable: {error}"})
    return moves


class AliasState(NamedTuple):
    """An alias as read, to follow or to swap: what it names, its compare-and-swap token, and why it is broken."""

    version: Optional[str]  # the version it names when it names one (which may not exist); None when unset or unreadable
    token: Optional[str]
    broken: Optional[str] = None  # why it cannot be followed (one line naming its file); None when unset or intact


def _alias_target(data: bytes, uri: str, model_name: str, alias: str) -> tuple[Optional[str], Optional[str]]:
    """(the version a pointer names, or None; why it is broken, or None): a JSON object whose "version" is a version name."""
    try:
        pointer = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        return None, f"alias {alias} of {model_name} is broken: {uri} is not JSON ({printable(error)})"
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        found = printable(json.dumps(pointer.get("version") if isinstance(pointer, dict) else pointer))[:60]
        return None, f"alias {alias} of {model_name} is broken: {uri} names no version (found {found})"
    return version, None


def read_alias(registry: str, model_name: str, alias: str) -> AliasState:
    """``alias`` as read, with the token to swap it with; never raises for a broken pointer (it says why)."""
    uri = _alias_uri(registry, model_name, alias)
    data, token = storage.read_with_token(uri)
    if data is None:
        return AliasState(None, None)
    version, broken = _alias_target(data, uri, model_name, alias)
    if broken is None and not version_exists(registry, model_name, version):
        broken = f"{broken_alias_message(model_name, alias, version)} ({uri})"
    return AliasState(version, token, broken)


def aliases_by_version(registry: str, model_name: str, on_unreadable: Callable[[str], None]) -> dict[str, list[str]]:
    """version -> the aliases pointing at it; a broken pointer is named to ``on_unreadable`` and skipped."""
    by_version: dict[str, list[str]] = {}
    for uri in storage.list_uris(storage.join(_model_root(registry, model_name), "aliases")):
        name = uri.replace("\\", "/").rsplit("/", 1)[-1]
        if name.endswith(".json"):
            try:
                alias = validate_model_name(name[: -len(".json")], what="alias")
                state = read_alias(registry, model_name, alias)
            except (ValueError, OSError, storage.S3Error) as error:
                on_unreadable(f"alias {printable(uri)} is unreadable: {printable(error)}")
                continue
            if state.broken:
                on_unreadable(state.broken)
            elif state.version is not None:
                by_version.setdefault(state.version, []).append(alias)
    return by_version


def broken_alias_message(model_name: str, alias: str, version: str) -> str:
    return f"alias {alias} of {model_name} points at {printable(version)}, which does not exist"


def get_alias(registry: str, model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias is not set.

    Raises BrokenAlias (one line naming the alias file) when the pointer is not JSON, names no
    version, or names a version that does not exist.
    """
    state = read_alias(registry, model_name, alias)
    if state.broken:
        raise BrokenAlias(state.broken)
    return state.version


def version_exists(registry: str, model_name: str, version: Any) -> bool:
    """Whether ``version`` is a well-formed version name with a committed card."""
    return bool(isinstance(version, str) and _VERSION.fullmatch(version)) and storage.exists(
        _card_uri(registry, model_name, version)
    )


def describe_alias(registry: str, model_name: str, alias: str) -> str:
    """For summaries: the version, "not set", or "broken: <why>"; never raises on a broken alias."""
    try:
        return get_alias(registry, model_name, alias) or "not set"
    except BrokenAlias as error:
        return f"broken: {error}"


def resolve(registry: str, model_name: str, version_or_alias: str) -> str:
    """The committed version named by a version ("v0003") or an alias ("champion").

    The one place a version or alias is looked up (loading, prediction, the CLI). Raises
    VersionNotFound naming the versions the registry holds, BrokenAlias when the alias
    names a missing version.
    """
    if isinstance(version_or_alias, str) and _VERSION.fullmatch(version_or_alias):
        if version_exists(registry, model_name, version_or_alias):
            return version_or_alias
        missing = f"no version {version_or_alias!r}"
    else:
        version = get_alias(registry, model_name, version_or_alias)
        if version is not None:
            return version
        missing = f"no alias {version_or_alias!r}"
    versions = list_versions(registry, model_name)
    held = f"versions: {', '.join(versions)}" if versions else f"it holds no version of {model_name!r}"
    raise VersionNotFound(f"{missing} of {model_name} in {registry}; {held}")


def _card_uri(registry: str, model_name: str, version: str) -> str:
    return storage.join(_model_root(registry, model_name), _check_version(version), "card.json")


def _refuse_links(registry: str, model_name: str, version: str, file_name: str) -> None:
    """Links in the registry are refused like links in a source: by name."""
    root = _model_root(registry, model_name)
    for uri in (root, storage.join(root, version), storage.join(root, version, file_name)):
        if storage.is_link(uri):
            raise CorruptCard(f"{model_name} {version}: {uri} is a symbolic link (to {os.readlink(uri)}): refused")


def load_card(registry: str, model_name: str, version: str) -> Card:
    """The card of a version (``version`` may also be an alias), verified: not a link, valid
    JSON, its digest (and HMAC, with PNEUMO_REGISTRY_KEY set) intact, its schema met.
    Raises CorruptCard naming the file otherwise."""
    version = resolve(registry, model_name, version)
    uri = _card_uri(registry, model_name, version)
    _refuse_links(registry, model_name, version, "card.json")
    where = f"{model_name} {version}: {uri}"
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"no version {version!r} of {model_name} in {registry} ({uri} is missing)") from None
    except (ValueError, UnicodeDecodeError) as error:  # truncated or not JSON
        raise CorruptCard(f"{where} is not a readable card: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise CorruptCard(f"{where} is not a card: a JSON {type(data).__name__}, not an object")
    check_seal(data, where, registry_key())  # over the bytes as written, before anything is parsed
    card = Card.from_json(data, where)
    if card.version != version or card.model_name != model_name:  # a card copied from another version
        raise CorruptCard(f"{where} is the card of {card.model_name} {card.version}, not of {model_name} {version}")
    return card


def verify_version(registry: str, model_name: str, version: str) -> Card:
    """The card of a version whose every listed file is present, unlinked and has the recorded
    sha256 and size (model.pt's shapes are checked by ``load_state_dict``); CorruptModel otherwise."""
    card = load_card(registry, model_name, version)
    for name in card.files:
        read_verified(registry, model_name, version, name, card)
    return card


def _expected_n_features(card: Card, state_dict: dict[str, Any]) -> int | None:
    transform = card.config.transform if card.config else None
    if transform:
        # Every part counts: the robust recipe pools max and mean, 2 x 70 features.
        return transform.grid[0] * transform.grid[1] * len(transform.pooling)

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


def read_verified(
    registry: str, model_name: str, version: str, name: str, card: Optional[Card] = None
) -> bytes:
    """A file of a committed version (model.pt, model.onnx, ...), checked against the sha256 and
    size its card records; CorruptModel when they differ. Needs no torch."""
    card = card if card is not None else load_card(registry, model_name, version)
    uri = storage.join(_model_root(registry, model_name), _check_version(version), name)
    _refuse_links(registry, model_name, version, name)
    listed = card.files.get(name)
    if listed is None:
        raise CorruptModel(f"{model_name} {version}: {uri} is not listed in its card: nothing to check it against")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CorruptModel(f"{model_name} {version}: {uri} is missing (its card lists it)") from None
    actual, expected = file_entry(data), listed.model_dump()
    if actual != expected:
        raise CorruptModel(
            f"{model_name} {version}: {uri} is corrupt: expected sha256 {expected['sha256']} "
            f"({expected['bytes']} bytes), found sha256 {actual['sha256']} ({actual['bytes']} bytes)"
        )
    return data


def load_state_dict(registry: str, model_name: str, version: str) -> dict[str, torch.Tensor]:
    """The weights of a committed version (``version`` may be an alias), loaded with weights_only.

    Raises CorruptModel when model.pt does not have the sha256 and size its card recorded,
    cannot be read, or is not a TinyNet for the card's feature count.
    """
    version = resolve(registry, model_name, version)
    card = load_card(registry, model_name, version)  # refuses uncommitted versions
    data = read_verified(registry, model_name, version, "model.pt", card)
    where = f"{model_name} {version}: {storage.join(_model_root(registry, model_name), version, 'model.pt')}"
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


def write_promotion(registry: str, model_name: str, version: str, outcome: dict[str, Any]) -> None:
    """Keep how the champion promotion of ``version`` ended; the first outcome written stays."""
    uri = storage.join(_model_root(registry, model_name), _check_version(version), "promotion.json")
    try:
        storage.write_json(uri, outcome, if_absent=True)
    except storage.AlreadyExists:  # a retried or repeated promotion
        pass


def model_ref(registry: str, model_name: str, version: str) -> ModelRef:
    folder = storage.join(_model_root(registry, model_name), version)
    card = load_card(registry, model_name, version)
    return ModelRef(
        registry=registry,
        model_name=model_name,
        version=version,
        card_uri=storage.join(folder, "card.json"),
        model_uri=storage.join(folder, "model.pt"),
        metrics=card.metrics,
        champion_comparison=card.as_json().get("champion_comparison"),
        promotion=read_promotion(registry, model_name, version),
    )


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

    ``champion_comparison`` is how the new model fared against the champion when it was
    registered (``promotion.Decision.to_json``). ``extra`` adds the fields other writers own,
    as they are: the evaluation's (threshold, threshold_rule, plots: ``Evaluation.card_fields``),
    the recipe, warnings... A field written here is never written by ``extra`` too (ValueError):
    each field of a card has one writer.
    """
    from pneumo.model import TinyNet, keras_parameter_count

    model = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
    model.load_state_dict(state_dict)
    card = {
        "schema_version": CARD_SCHEMA_VERSION,
        "labels": LABELS,
        "confusion_matrix_layout": CONFUSION_MATRIX_LAYOUT,
        "n_parameters": keras_parameter_count(model),
        "metrics": metrics,
        "training": training,
        "config": config,
        "data": {"manifest_digest": manifest_digest, "shards_digest": shards_digest, "counts": counts},
        "code_version": pneumo.code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "champion_comparison": champion_comparison,
    }
    twice = sorted(card.keys() & extra.keys())
    if twice:
        raise ValueError(f"card field(s) {', '.join(twice)} would be written twice: build_card writes them")
    return {**card, **extra}
