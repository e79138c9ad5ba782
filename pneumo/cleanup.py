"""What a workdir can lose: the outputs no registered version, alias or recent run needs.

Every run adds to its workdir (manifests, size stats, shards, quarantine reports, downloads,
predictions), and nothing removed any of it. ``plan`` sorts each output into kept (with the
reason) or removable (with its size); ``remove`` deletes only the removable ones. What is
kept:

- what a registered version was built from, read from its card: the manifest and size
  stats of ``data.manifest_digest``, the shard folder whose ``index.json`` has the sha256
  ``data.shards_digest``, that index's quarantine report, and the predictions made with it.
  ``only_aliased`` narrows this to the versions an alias (champion, latest, ...) points at;
- what a recent run used or wrote: anything modified within ``keep_recent`` seconds, and
  the manifest and shards recorded by a run that ended within it (a cache hit reads old
  files without touching them);
- everything, while a run is running in the workdir: its record (``runs/``, written by
  ``recording_run``) is live, so ``remove`` refuses.

Never looked at, never removed: the registry, Prefect's results (``prefect-results/``),
run records of live runs, and any folder this module does not know.
Works the same on a local folder and an ``s3://`` prefix (one listing of the workdir).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from pneumo import storage
from pneumo import workdir as layout

RUNS = "runs"  # run records: {workdir}/runs/{run id}.json
KINDS = ("shards", "manifests", "stats", "reports", "downloads", "predictions", RUNS)
DEFAULT_KEEP_RECENT = 24 * 3600.0
STALE_RUN = 24 * 3600.0  # a "running" record of another host older than this is a dead run's

_VERSION_CARD = re.compile(r"^(?P<model>[^/]+)/(?P<version>v\d{4,})/card\.json$")
_ALIAS = re.compile(r"^(?P<model>[^/]+)/aliases/(?P<alias>[^/]+)\.json$")


@dataclass
class Item:
    """One output of the workdir: a file, or a folder of files (a shard set, a download)."""

    kind: str  # one of KINDS
    uri: str
    files: list[storage.Entry] = field(default_factory=list)
    keep: Optional[str] = None  # why it stays; None: nothing needs it

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.files)

    @property
    def modified(self) -> float:
        return max((entry.modified for entry in self.files), default=0.0)


@dataclass
class Plan:
    workdir: str
    items: list[Item]
    running: list[dict[str, Any]]  # live run records: nothing may be removed while they run
    versions: list[str]  # the registered versions whose inputs are kept, "model vNNNN"

    @property
    def removable(self) -> list[Item]:
        return [item for item in self.items if item.keep is None]

    @property
    def kept(self) -> list[Item]:
        return [item for item in self.items if item.keep is not None]


# --- Run records --------------------------------------------------------------------------


def _record_uri(workdir: str, run_id: str) -> str:
    return storage.join(layout.runs(workdir), f"{run_id}.json")


def start_run(workdir: str, run_id: Optional[str] = None) -> dict[str, Any]:
    """Record that a run is running in ``workdir`` (``plan`` then keeps everything); the record."""
    started = datetime.now(timezone.utc)
    record: dict[str, Any] = {
        "run_id": run_id or f"{started:%Y%m%dT%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": started.isoformat(timespec="seconds"),
        "state": "running",
    }
    storage.write_json(_record_uri(workdir, record["run_id"]), record)
    return record


def finish_run(workdir: str, run_id: str, state: str, **used: Any) -> None:
    """Record how the run ended ("finished", "failed") and what it used (``manifest_digest``,
    ``shards_digest``), which ``plan`` keeps while the run is recent. Never raises: a lost
    record must not hide the run's own outcome."""
    with contextlib.suppress(Exception):
        uri = _record_uri(workdir, run_id)
        try:
            record = storage.read_json(uri)
        except FileNotFoundError:
            return  # the run failed before it started its record (a bad parameter): no workdir to write into
        record.update(used, state=state, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        storage.write_json(uri, record)


@contextlib.contextmanager
def recording_run(workdir: str) -> Iterator[dict[str, Any]]:
    """``start_run`` and ``finish_run`` around a block, which may add ``manifest_digest`` and
    ``shards_digest`` to the record it is given (they are written when the run ends)."""
    record = start_run(workdir)
    try:
        yield record
    except BaseException:
        finish_run(workdir, record["run_id"], "failed", **_used(record))
        raise
    finish_run(workdir, record["run_id"], "finished", **_used(record))


def _used(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record[key] for key in ("manifest_digest", "shards_digest") if key in record}



def is_live(record: dict[str, Any], now: float) -> bool:
    """A running record whose process still runs (same host) or that is not stale (another host)."""
    if record.get("state") != "running":
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return storage.pid_alive(record["pid"])
    try:
        started = datetime.fromisoformat(record["started_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return True  # cannot tell: assume it runs
    return now - started < STALE_RUN


# --- What the registry needs --------------------------------------------------------------


def _needed_by_versions(registry: str, only_aliased: bool) -> tuple[list[str], set[str], set[str]]:
    """(versions, manifest digests, shard index digests) of the registered versions kept."""
    cards: dict[tuple[str, str], str] = {}
    aliased: set[tuple[str, str]] = set()
    for uri in storage.list_uris(registry):
        rel = _relative(registry, uri)
        if match := _VERSION_CARD.fullmatch(rel):
            cards[(match["model"], match["version"])] = uri
        elif match := _ALIAS.fullmatch(rel):
            with contextlib.suppress(Exception):  # a broken alias protects nothing
                aliased.add((match["model"], storage.read_json(uri)["version"]))
    versions, manifests, shards = [], set(), set()
    for key, uri in sorted(cards.items()):
        if only_aliased and key not in aliased:
            continue
        data = storage.read_json(uri).get("data") or {}
        versions.append(f"{key[0]} {key[1]}")
        if data.get("manifest_digest"):
            manifests.add(data["manifest_digest"])
        if data.get("shards_digest"):
            shards.add(data["shards_digest"])
    return versions, manifests, shards


# --- The plan -----------------------------------------------------------------------------


def _relative(root: str, uri: str) -> str:
    return uri[len(root.rstrip("/\\")) + 1:].replace("\\", "/")


def _unit(rel: str) -> Optional[tuple[str, str]]:
    """(kind, the item's path relative to the workdir) of a file, or None for what is never touched."""
    parts = rel.split("/")
    kind = parts[0]
    if kind not in KINDS or len(parts) < 2:
        return None
    depth = {"shards": 2, "downloads": 3, "predictions": 3}.get(kind, 2)  # a folder per item for these
    if kind in ("downloads", "predictions") and len(parts) <= depth:
        return kind, rel  # a file directly in the folder
    return kind, "/".join(parts[:depth])


def plan(
    workdir: str,
    registry: Optional[str] = None,
    *,
    keep_recent: float = DEFAULT_KEEP_RECENT,
    only_aliased: bool = False,
    now: Optional[float] = None,
) -> Plan:
    """Sort every output of ``workdir`` into kept (``Item.keep`` says why) and removable."""
    now = time.time() if now is None else now
    workdir = workdir if storage.is_s3(workdir) else str(Path(workdir).absolute())
    registry = registry or layout.registry(workdir)
    registry = registry if storage.is_s3(registry) else str(Path(registry).absolute())
    versions, manifests, shards = _needed_by_versions(registry, only_aliased)
    kept_versions = {tuple(v.split(" ")) for v in versions}

    items: dict[str, Item] = {}
    for entry in storage.list_entries(workdir):  # the registry and prefect-results/ are no KINDS: never items
        unit = _unit(_relative(workdir, entry.uri))
        if unit is None:
            continue
        kind, rel = unit
        items.setdefault(rel, Item(kind, storage.join(workdir, *rel.split("/")))).files.append(entry)

    running, recent_manifests, recent_shards = [], set(), set()
    for rel, item in items.items():
        if item.kind != RUNS:
            continue
        with contextlib.suppress(Exception):  # an unreadable record is an old run's
            record = storage.read_json(item.uri)
            if is_live(record, now):
                running.append(record)
                item.keep = "the record of a running run"
            elif now - item.modified < keep_recent:
                recent_manifests.add(record.get("manifest_digest"))
                recent_shards.add(record.get("shards_digest"))

    for rel, item in items.items():
        if item.keep is None:
            item.keep = _why_kept(item, rel, manifests, shards, recent_manifests, recent_shards, kept_versions)
        if item.keep is None and now - item.modified < keep_recent:
            item.keep = f"recent: modified {_age(now - item.modified)} ago"
    ordered = sorted(items.values(), key=lambda item: (KINDS.index(item.kind), item.uri))
    return Plan(workdir=workdir, items=ordered, running=running, versions=versions)


def _why_kept(item, rel, manifests, shards, recent_manifests, recent_shards, kept_versions) -> Optional[str]:
    name = rel.rsplit("/", 1)[-1]
    if item.kind in ("manifests", "stats"):
        digest = re.sub(r"^(manifest|sizes)-|\.json$", "", name)
        if any(d and d.startswith(digest) for d in manifests):
            return "a registered version's dataset"
        if any(d and d.startswith(digest) for d in recent_manifests):
            return "used by a recent run"
        return None
    if item.kind == "shards":
        index = next((e for e in item.files if e.uri.replace("\\", "/").endswith("/index.json")), None)
        if index is None:
            return None  # an unfinished shard set: a killed run's
        digest = hashlib.sha256(storage.read_bytes(index.uri)).hexdigest()
        if digest in shards:
            return "a registered version's shards"
        if digest in recent_shards:
            return "used by a recent run"
        return None
    if item.kind == "reports":
        digest = re.sub(r"^quarantine-|\.json$", "", name)
        if any(d and d.startswith(digest) for d in shards | recent_shards):
            return "the quarantine report of kept shards"
        return None
    if item.kind == "predictions":
        parts = rel.split("/")
        if len(parts) == 3 and (parts[1], parts[2]) in kept_versions:
            return "predictions of a registered version"
        return None
    return None  # downloads and finished run records: only recency keeps them


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.0f} days"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class RunInProgress(RuntimeError):
    """A run is running in the workdir: removing anything could pull files from under it."""


def remove(plan_: Plan) -> int:
    """Delete the removable items of ``plan_``; return the bytes freed.

    Refuses (RunInProgress) while a run is live in the workdir, checked again just before
    deleting: a run that started after the plan was made is seen.
    """
    now = time.time()
    live = list(plan_.running)
    for entry in storage.list_entries(layout.runs(plan_.workdir)):
        with contextlib.suppress(Exception):
            record = storage.read_json(entry.uri)
            if is_live(record, now) and record not in live:
                live.append(record)
    if live:
        runs = ", ".join(f"{r.get('run_id')} (pid {r.get('pid')} on {r.get('host')})" for r in live)
        raise RunInProgress(f"a run is in progress in {plan_.workdir}: {runs}; nothing removed, try again when it ends")
    freed = 0
    for item in plan_.removable:
        for entry in item.files:
            storage.delete(entry.uri)
            freed += entry.bytes
        if not storage.is_s3(item.uri):
            _remove_empty_folders(Path(item.uri), Path(plan_.workdir))
    return freed


def _remove_empty_folders(path: Path, root: Path) -> None:
    """Remove ``path`` if it is an empty folder (or a folder of empty folders), then its empty parents up to ``root``."""
    if path.is_dir():
        for folder, _, _ in sorted(os.walk(path), key=lambda walked: -len(walked[0])):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def describe(plan_: Plan) -> list[str]:
    """The plan for a person: removable items with sizes, then kept items with reasons, then totals."""
    lines = []
    for item in plan_.removable:
        lines.append(f"  remove  {human_bytes(item.bytes):>9}  {item.uri}")
    for item in plan_.kept:
        lines.append(f"  keep    {human_bytes(item.bytes):>9}  {item.uri}  ({item.keep})")
    total = sum(item.bytes for item in plan_.removable)
    kept = sum(item.bytes for item in plan_.kept)
    lines.append(
        f"  {len(plan_.removable)} removable ({human_bytes(total)}), {len(plan_.kept)} kept ({human_bytes(kept)}); "
        f"versions whose inputs are kept: {', '.join(plan_.versions) or 'none'}"
    )
    return lines


def to_json(plan_: Plan) -> str:
    items = [{"kind": i.kind, "uri": i.uri, "bytes": i.bytes, "keep": i.keep} for i in plan_.items]
    return json.dumps({"workdir": plan_.workdir, "versions": plan_.versions, "running": plan_.running, "items": items}, indent=2)


def parse_duration(text: str) -> float:
    """Seconds of "90s", "30m", "24h", "7d" or a bare number of hours ("0": nothing is recent)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30m, 24h, 7d or 0")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[match[2]]
