"""Stage 3 storage, the file format: features in HDF5 shards of a bounded number of images, and their index.

The rows come from pneumo.features; planning and writing the stage is pneumo.shards's.

A shard is written by one process into a local temporary file, then uploaded in one
atomic step, so readers never see half a shard. The same inputs give the same bytes (no
timestamps), which lets a retry find its finished output and return it unchanged.

Shard contract (SHARD_SCHEMA_VERSION 3, BORDERS_SCHEMA_VERSION 4):
    datasets  features float32 (n, n_features), labels uint8 (n,),
              relpaths and patient_ids UTF-8 strings (n,),
              renditions uint8 (n,): 0 for an image as it is, 1..K for its augmented renditions,
              which follow their original (train only: val and test rows are all 0);
              val and test, with the shift suite on: shift_features float32 (n_shifts, n, n_features);
              val, with the shift suite on: stress_features float32 (n, n_jitters, n_features),
              the stress val (pneumo.shift.stress_features: each image under random strong jitters);
              val and test, with test-time views: view_features float32 (n, n_views, n_features),
              val, with views and the shift suite: stress_view_features float32 (n, n_jitters, n_views, n_features)
              (pneumo.views: what the card's figures and threshold are scored with);
              with trim_padding (version 4): borders float32 (n, 2), the share of the film's rows and of its
              columns trimmed as padding (a rendition repeats its film's), and for val and test with the
              shift suite shift_borders float32 (n_shifts, n, 2) (pneumo.drift's border test)
              val and test, with views and the shift suite: film_bytes uint8 vlen (n,), each film's own file
              bytes, from which the evaluation makes the shift suite's views (pneumo.views.shift_scores):
              24 x n_views rows per film would be ~215 KB, a 224 px film's bytes are ~7 KB
    attrs     transform (TransformConfig JSON), split_config (SplitConfig JSON),
              manifest_digest, schema_version, split, number, start, stop,
              quarantine_json (the images of this shard that were refused, with reasons),
              shift_names (JSON list, with shift_features)

Version 2 added renditions and the shift suite, version 3 the stress val; the views' datasets
are new in version 3 and only in shards of a transform with views; the seed recipe's features are unchanged.
Version 4 adds the borders, and only shards of a transform that trims padding are version 4
(``schema_version``): the others keep version 3 and their bytes, while a version 3 shard of a
trimming transform, which lacks the borders, is written again (its attributes no longer match).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict

from pneumo import shift, storage
from pneumo.config import SplitConfig, TransformConfig
from pneumo.manifest import CLASSES, SPLITS, ImageRecord, QuarantineEntry

SHARD_SCHEMA_VERSION = 3  # the layout of a shard and its index (not the card's: registry.CARD_SCHEMA_VERSION)
BORDERS_SCHEMA_VERSION = 4  # the layout with borders: only for transforms that trim padding (``schema_version``)
INDEX_NAME = "index.json"


class CorruptShard(ValueError):
    """A shard whose bytes or contents are not what its index says."""


class ShardSpec(BaseModel):
    """Everything needed to write one shard: a slice of one split of one manifest.

    The spec carries its own records, so a shard task reads ``shard_size`` records rather
    than the whole manifest: its memory is bounded by the shard, not by the dataset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str  # the local folder the records' relpaths resolve against
    manifest_digest: str
    split_config: SplitConfig
    transform: TransformConfig  # with its size already resolved from the size percentiles
    split: Literal["train", "val", "test"]
    number: int
    start: int  # slice of records_by_split(manifest, split_config)[split]
    stop: int
    records: tuple[ImageRecord, ...]  # that slice
    uri: str  # the .h5 file to write


class ShardResult(BaseModel):
    uri: str
    split: str
    number: int
    count: int  # images stored
    rows: int = 0  # rows stored: images plus their renditions (0: same as count)
    class_counts: dict[str, int]  # images stored per class name
    sha256: str  # of the file's bytes
    quarantine: list[QuarantineEntry] = []


@dataclass(frozen=True)
class ShardData:
    features: np.ndarray  # float32 (n, n_features)
    labels: np.ndarray  # uint8 (n,)
    relpaths: list[str]
    patient_ids: list[str]
    renditions: np.ndarray | None = None  # uint8 (n,): 0 = the image itself, 1..K = its renditions
    shift: dict[str, np.ndarray] = field(default_factory=dict)  # val/test: shift name -> (n, n_features)
    stress: np.ndarray | None = None  # val: (n, n_jitters, n_features), the stress val; never trained on
    views: np.ndarray | None = None  # val/test with test-time views: (n, n_views, n_features)
    stress_views: np.ndarray | None = None  # val: (n, n_jitters, n_views, n_features), each stress row's views
    borders: np.ndarray | None = None  # trim_padding: (n, 2), share of rows and columns trimmed; None before schema 4
    shift_borders: dict[str, np.ndarray] = field(default_factory=dict)  # val/test, trim_padding: shift name -> (n, 2)
    films: list[bytes] | None = None  # val/test with views and the shift suite: each film's file bytes

    def __post_init__(self) -> None:
        if self.renditions is None:
            object.__setattr__(self, "renditions", np.zeros(len(self.labels), np.uint8))

    def originals(self) -> "ShardData":
        """The rows of the images themselves (rendition 0), one per image, with their shift rows."""
        keep = self.renditions == 0
        if keep.all():
            return self
        where = np.flatnonzero(keep)
        return ShardData(
            features=self.features[keep],
            labels=self.labels[keep],
            relpaths=[self.relpaths[i] for i in where],
            patient_ids=[self.patient_ids[i] for i in where],
            renditions=self.renditions[keep],
            shift={name: rows[keep] for name, rows in self.shift.items()},
            stress=None if self.stress is None else self.stress[keep],
            views=None if self.views is None else self.views[keep],
            stress_views=None if self.stress_views is None else self.stress_views[keep],
            borders=None if self.borders is None else self.borders[keep],
            shift_borders={name: rows[keep] for name, rows in self.shift_borders.items()},
            films=None if self.films is None else [self.films[i] for i in where],
        )


def with_film_bytes(config: TransformConfig, split: str) -> bool:
    """Whether the images of ``split`` keep their file bytes in the shard (val and test, with views and the
    shift suite): the evaluation makes the shift suite's views from them (pneumo.views.shift_scores)."""
    return config.views.count > 0 and config.shift_suite and split != "train"


def shard_dir(out_dir: str, manifest_digest: str, transform: TransformConfig, split_config: SplitConfig, shard_size: int) -> str:
    """The folder of one set of shards, named after everything that decides their contents.

    The shard size is in the name too: with another size, ``train-0001.h5`` holds other images.
    """
    name = f"{manifest_digest[:16]}-{transform.digest()[:8]}-{split_config.digest()[:8]}-n{shard_size}"
    return storage.join(out_dir, name)


def index_uri(out_dir: str, manifest_digest: str, transform: TransformConfig, split_config: SplitConfig, shard_size: int) -> str:
    return storage.join(shard_dir(out_dir, manifest_digest, transform, split_config, shard_size), INDEX_NAME)


def schema_version(transform: TransformConfig) -> int:
    """The shard layout of ``transform``'s shards: 4 (with borders) when it trims padding, else 3."""
    return BORDERS_SCHEMA_VERSION if transform.trim_padding else SHARD_SCHEMA_VERSION


def _spec_attrs(spec: ShardSpec) -> dict:
    """The attributes that identify a shard's contents (not where it or its manifest live)."""
    return {
        "transform": spec.transform.model_dump_json(),
        "split_config": spec.split_config.model_dump_json(),
        "manifest_digest": spec.manifest_digest,
        "schema_version": schema_version(spec.transform),
        "split": spec.split,
        "number": spec.number,
        "start": spec.start,
        "stop": spec.stop,
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _result_from_file(spec: ShardSpec, path: Path) -> ShardResult | None:
    """The result of an existing shard file, or None when it is not a complete shard of ``spec``."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: f.attrs[key] for key in _spec_attrs(spec)}
            attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in attrs.items()}
            if attrs != _spec_attrs(spec):
                return None
            labels = f["labels"][:]
            renditions = f["renditions"][:]
            if with_film_bytes(spec.transform, spec.split) and "film_bytes" not in f:
                return None  # written before the shift suite was scored with views: recompute
            quarantine = json.loads(f.attrs["quarantine_json"])
    except (OSError, KeyError, ValueError):
        return None  # unreadable or from an older schema: recompute
    return _result(spec, labels, renditions, _sha256_file(path), [QuarantineEntry(**entry) for entry in quarantine])


def _result(
    spec: ShardSpec, labels: np.ndarray, renditions: np.ndarray, sha256: str, quarantine: list[QuarantineEntry]
) -> ShardResult:
    originals = labels[renditions == 0]  # counts are of images; renditions are extra rows
    return ShardResult(
        uri=spec.uri,
        split=spec.split,
        number=spec.number,
        count=len(originals),
        rows=len(labels),
        class_counts={name: int((originals == label).sum()) for label, name in enumerate(CLASSES)},
        sha256=sha256,
        quarantine=quarantine,
    )


def _write_h5(
    path: Path, spec: ShardSpec, features, labels, relpaths, patient_ids, quarantine, renditions=None, shifted=None,
    stressed=None, views=None, stress_views=None, borders=None, shift_borders=None, films=None,
) -> None:
    """Write one shard file; ``renditions`` defaults to all 0 (every row an original image)."""
    if renditions is None:
        renditions = np.zeros(len(labels), np.uint8)
    strings = h5py.string_dtype("utf-8")
    # Fixed libver and no creation times: the same inputs give the same bytes.
    with h5py.File(path, "w", libver=("v110", "v110"), track_order=False) as f:
        f.create_dataset("features", data=features, dtype=np.float32, track_times=False)
        f.create_dataset("labels", data=labels, dtype=np.uint8, track_times=False)
        f.create_dataset("relpaths", data=relpaths, dtype=strings, track_times=False)
        f.create_dataset("patient_ids", data=patient_ids, dtype=strings, track_times=False)
        f.create_dataset("renditions", data=renditions, dtype=np.uint8, track_times=False)
        if shifted is not None:
            f.create_dataset("shift_features", data=shifted, dtype=np.float32, track_times=False)
            f.attrs["shift_names"] = json.dumps(list(shift.NAMES))
        if stressed is not None:
            f.create_dataset("stress_features", data=stressed, dtype=np.float32, track_times=False)
        for name, rows in (("view_features", views), ("stress_view_features", stress_views), ("borders", borders),
                           ("shift_borders", shift_borders)):
            if rows is not None:
                f.create_dataset(name, data=rows, dtype=np.float32, track_times=False)
        if films is not None:
            stored = np.empty(len(films), dtype=object)
            stored[:] = [np.frombuffer(film, np.uint8) for film in films]
            f.create_dataset("film_bytes", data=stored, dtype=h5py.vlen_dtype(np.uint8), track_times=False)
        for key, value in _spec_attrs(spec).items():
            f.attrs[key] = value
        f.attrs["quarantine_json"] = json.dumps([q.model_dump() for q in quarantine])


def finished_result(spec: ShardSpec) -> ShardResult | None:
    """The result of the complete shard of ``spec`` already at ``spec.uri``, or None: a retry returns it unchanged."""
    if not storage.exists(spec.uri):
        return None
    with storage.local_copy(spec.uri) as existing:
        return _result_from_file(spec, existing)


def write_file(spec: ShardSpec, data: ShardData, quarantine: list[QuarantineEntry]) -> ShardResult:
    """Store ``data`` as the shard of ``spec``: written to a local temporary file, then uploaded to ``spec.uri`` at once.

    ``data.shift`` holds every shift of shift.NAMES or none; ``quarantine`` lists the
    images of the spec that were refused.
    """
    shifted = np.stack([data.shift[name] for name in shift.NAMES]) if data.shift else None
    shift_borders = np.stack([data.shift_borders[name] for name in shift.NAMES]) if data.shift_borders else None
    with tempfile.TemporaryDirectory(prefix="pneumo-shard-") as tmp:
        local = Path(tmp, Path(spec.uri).name)
        _write_h5(local, spec, data.features, data.labels, data.relpaths, data.patient_ids, quarantine, data.renditions,
                  shifted, data.stress, data.views, data.stress_views, data.borders, shift_borders, data.films)
        sha256 = _sha256_file(local)
        storage.upload_file(local, spec.uri)
    return _result(spec, data.labels, data.renditions, sha256, quarantine)


def shard_problem(uri: str, expected_sha256: str) -> str | None:
    """Why a written shard can no longer be trusted ("missing", changed bytes), or None if intact."""
    if not storage.exists(uri):
        return "missing"
    with storage.local_copy(uri) as path:
        actual = _sha256_file(path)
    if actual != expected_sha256:
        return f"bytes changed since it was written (sha256 {actual[:12]}…, expected {expected_sha256[:12]}…)"
    return None


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)


def write_index(
    results: list[ShardResult],
    index_uri: str,
    *,
    manifest_digest: str,
    transform: TransformConfig,
    split_config: SplitConfig,
) -> str:
    """Write ``index.json`` next to the shards; return its URI.

    The index names shards relative to its own folder, so a shard folder can be moved or
    copied to S3 as a whole. Counts are per split and class of the images stored.
    """
    folder = _parent(index_uri)
    shards, counts, quarantine = [], {s: {c: 0 for c in CLASSES} for s in SPLITS}, []
    order = {split: i for i, split in enumerate(SPLITS)}
    for result in sorted(results, key=lambda r: (order[r.split], r.number)):
        if _parent(result.uri) != folder:
            raise ValueError(f"shard {result.uri} is not in the index folder {folder}; write the index next to its shards")
        name = result.uri[len(folder) :].lstrip("/\\")
        shards.append(
            {"name": name, "split": result.split, "number": result.number, "count": result.count,
             "rows": result.rows or result.count, "sha256": result.sha256}
        )
        for class_name, count in result.class_counts.items():
            counts[result.split][class_name] += count
        quarantine.extend(q.model_dump() for q in result.quarantine)
    index = {
        "schema_version": schema_version(transform),
        "manifest_digest": manifest_digest,
        "transform": transform.model_dump(mode="json"),
        "split_config": split_config.model_dump(mode="json"),
        "shards": shards,
        "counts": counts,
        "quarantine": quarantine,
    }
    storage.write_json(index_uri, index)
    return index_uri


class IndexRef(BaseModel):
    """What the shard stage hands to training: the index and a summary of it."""

    model_config = ConfigDict(frozen=True)

    uri: str
    digest: str  # sha256 of index.json: the exact features a model is trained on
    n_shards: int
    counts: dict[str, dict[str, int]]  # images per split and class name
    n_quarantined: int


def index_ref(index_uri: str) -> IndexRef:
    index = read_index(index_uri)
    return IndexRef(
        uri=index_uri,
        digest=index_digest(index_uri),
        n_shards=len(index["shards"]),
        counts=index["counts"],
        n_quarantined=len(index["quarantine"]),
    )


def index_config(index_uri: str) -> dict:
    """The transform and split configs the shards of an index were made with."""
    index = read_index(index_uri)
    return {"transform": index["transform"], "split": index["split_config"]}


def read_index(index_uri: str) -> dict:
    return storage.read_json(index_uri)


def index_digest(index_uri: str) -> str:
    """sha256 of the index file: identifies the exact features a model was trained on."""
    return hashlib.sha256(storage.read_bytes(index_uri)).hexdigest()


def read_shard(uri: str, expected_sha256: str | None = None) -> ShardData:
    """Load a shard; with ``expected_sha256``, raise CorruptShard if its bytes differ."""
    with storage.local_copy(uri) as path:
        if expected_sha256 is not None:
            actual = _sha256_file(path)
            if actual != expected_sha256:
                raise CorruptShard(
                    f"shard {uri} has sha256 {actual[:16]}…, its index says {expected_sha256[:16]}…; "
                    "delete it and run the transform again"
                )
        try:
            with h5py.File(path, "r") as f:
                shifted, shift_borders = {}, {}
                if "shift_features" in f:
                    names = json.loads(f.attrs["shift_names"])
                    shifted = dict(zip(names, f["shift_features"][:]))
                    if "shift_borders" in f:
                        shift_borders = dict(zip(names, f["shift_borders"][:]))
                return ShardData(
                    features=f["features"][:],
                    labels=f["labels"][:],
                    relpaths=[s.decode() for s in f["relpaths"][:]],
                    patient_ids=[s.decode() for s in f["patient_ids"][:]],
                    renditions=f["renditions"][:] if "renditions" in f else None,  # schema 1: no renditions
                    shift=shifted,
                    stress=f["stress_features"][:] if "stress_features" in f else None,
                    views=f["view_features"][:] if "view_features" in f else None,
                    stress_views=f["stress_view_features"][:] if "stress_view_features" in f else None,
                    borders=f["borders"][:] if "borders" in f else None,  # before schema 4, or no trim_padding
                    shift_borders=shift_borders,
                    films=[film.tobytes() for film in f["film_bytes"][:]] if "film_bytes" in f else None,
                )
        except (OSError, KeyError) as error:
            raise CorruptShard(f"shard {uri} is not a readable shard ({error}); delete it and run the transform again") from None


def load_split(index_uri: str, split: str) -> ShardData:
    """All rows of one split (train: images and their renditions), checked against the index's
    sha256s, read one shard at a time. Val and test carry their shift-suite features, if stored."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    index = read_index(index_uri)
    folder = _parent(index_uri)
    entries = [s for s in index["shards"] if s["split"] == split]
    n_features = TransformConfig.stored(index["transform"]).n_features
    total = sum(s.get("rows", s["count"]) for s in entries)  # schema 1 indexes: one row per image
    features = np.empty((total, n_features), np.float32)
    labels = np.empty(total, np.uint8)
    renditions = np.empty(total, np.uint8)
    relpaths, patient_ids, shifted, stressed = [], [], {}, []
    viewed: dict[str, list[np.ndarray]] = {"views": [], "stress_views": [], "borders": []}
    shift_borders: dict[str, list[np.ndarray]] = {}
    films: list[bytes] = []
    at = 0
    for entry in entries:
        # An index names shards in its own folder; anything else is tampering.
        if not re.fullmatch(r"(train|val|test)-\d{4}\.h5", entry["name"]):
            raise CorruptShard(f"index {index_uri} lists an unexpected shard name {entry['name']!r}")
        shard = read_shard(storage.join(folder, entry["name"]), expected_sha256=entry["sha256"])
        n = len(shard.labels)
        rows = entry.get("rows", entry["count"])
        if n != rows or int((shard.renditions == 0).sum()) != entry["count"]:
            raise CorruptShard(
                f"shard {entry['name']} holds {n} rows of {int((shard.renditions == 0).sum())} images, "
                f"its index says {rows} of {entry['count']}"
            )
        features[at : at + n] = shard.features
        labels[at : at + n] = shard.labels
        renditions[at : at + n] = shard.renditions
        relpaths.extend(shard.relpaths)
        patient_ids.extend(shard.patient_ids)
        for name, rows in shard.shift.items():
            shifted.setdefault(name, []).append(rows)
        for name, rows in shard.shift_borders.items():
            shift_borders.setdefault(name, []).append(rows)
        if shard.stress is not None:
            stressed.append(shard.stress)
        for name, parts in viewed.items():
            if getattr(shard, name) is not None:
                parts.append(getattr(shard, name))
        films.extend(shard.films or [])
        at += n
    shifted = {name: np.concatenate(parts) for name, parts in shifted.items()}
    if shifted and any(len(rows) != total for rows in shifted.values()):
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the shift suite")
    stress = np.concatenate(stressed) if stressed else None
    if stress is not None and len(stress) != total:
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the stress val")
    joined = {name: np.concatenate(parts) if parts else None for name, parts in viewed.items()}
    if any(rows is not None and len(rows) != total for rows in joined.values()):
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the test-time views or the borders")
    shift_borders = {name: np.concatenate(parts) for name, parts in shift_borders.items()}
    if any(len(rows) != total for rows in shift_borders.values()):
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the shift suite's borders")
    if films and len(films) != total:
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold their films' bytes")
    return ShardData(
        features=features, labels=labels, relpaths=relpaths, patient_ids=patient_ids, renditions=renditions, shift=shifted,
        stress=stress, shift_borders=shift_borders, **joined, films=films or None,
    )
