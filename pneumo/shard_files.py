"""Stage 3 storage: features in HDF5 shards of a bounded number of images, and their index.

A shard is written by one process into a local temporary file, then uploaded in one
atomic step, so readers never see half a shard. The same inputs give the same bytes (no
timestamps), which lets a retry find its finished output and return it unchanged.

Shard contract (SHARD_SCHEMA_VERSION 3):
    datasets  features float32 (n, n_features), labels uint8 (n,),
              relpaths and patient_ids UTF-8 strings (n,),
              renditions uint8 (n,): 0 for an image as it is, 1..K for its augmented renditions,
              which follow their original (train only: val and test rows are all 0);
              val and test, with the shift suite on: shift_features float32 (n_shifts, n, n_features);
              val, with the shift suite on: stress_features float32 (n, n_jitters, n_features),
              the stress val (pneumo.shift.stress_features: each image under random strong jitters)
    attrs     transform (TransformConfig JSON), split_config (SplitConfig JSON),
              manifest_digest, schema_version, split, number, start, stop,
              quarantine_json (the images of this shard that were refused, with reasons),
              shift_names (JSON list, with shift_features)

Version 2 added renditions and the shift suite, version 3 the stress val; the seed recipe's
features are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict

from pneumo import augment, shift, storage
from pneumo.config import SplitConfig, TransformConfig
from pneumo.images import ImageRejected, decode_gray
from pneumo.manifest import CLASSES, SPLITS, ImageRecord, Manifest, QuarantineEntry
from pneumo.splits import records_by_split
from pneumo.transform import featurize

SHARD_SCHEMA_VERSION = 3  # the layout of a shard and its index (not the card's: registry.CARD_SCHEMA_VERSION)
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
        )


def shard_dir(out_dir: str, manifest_digest: str, transform: TransformConfig, split_config: SplitConfig, shard_size: int) -> str:
    """The folder of one set of shards, named after everything that decides their contents.

    The shard size is in the name too: with another size, ``train-0001.h5`` holds other images.
    """
    name = f"{manifest_digest[:16]}-{transform.digest()[:8]}-{split_config.digest()[:8]}-n{shard_size}"
    return storage.join(out_dir, name)


def index_uri(out_dir: str, manifest_digest: str, transform: TransformConfig, split_config: SplitConfig, shard_size: int) -> str:
    return storage.join(shard_dir(out_dir, manifest_digest, transform, split_config, shard_size), INDEX_NAME)


def plan_shards(
    manifest: Manifest,
    split_config: SplitConfig,
    transform: TransformConfig,
    shard_size: int,
    out_dir: str,
) -> list[ShardSpec]:
    """One spec per ``shard_size`` images of each split, in split then relpath order.

    The specs read the images from ``manifest.root``: the folder the manifest was built
    from, or the one given to ``load_manifest`` (the run's ManifestRef.root).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of images, got {shard_size}")
    root = manifest.images_root()
    digest = manifest.digest()
    folder = shard_dir(out_dir, digest, transform, split_config, shard_size)
    by_split = records_by_split(manifest, split_config)
    specs = []
    for split in SPLITS:
        for number, start in enumerate(range(0, len(by_split[split]), shard_size)):
            stop = min(start + shard_size, len(by_split[split]))
            specs.append(
                ShardSpec(
                    root=root,
                    manifest_digest=digest,
                    split_config=split_config,
                    transform=transform,
                    split=split,
                    number=number,
                    start=start,
                    stop=stop,
                    records=tuple(by_split[split][start:stop]),
                    uri=storage.join(folder, f"{split}-{number:04d}.h5"),
                )
            )
    return specs


def _spec_attrs(spec: ShardSpec) -> dict:
    """The attributes that identify a shard's contents (not where it or its manifest live)."""
    return {
        "transform": spec.transform.model_dump_json(),
        "split_config": spec.split_config.model_dump_json(),
        "manifest_digest": spec.manifest_digest,
        "schema_version": SHARD_SCHEMA_VERSION,
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
    stressed=None,
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
        for key, value in _spec_attrs(spec).items():
            f.attrs[key] = value
        f.attrs["quarantine_json"] = json.dumps([q.model_dump() for q in quarantine])


# Files up to this size are verified and featurized in memory; bigger ones go through a temporary file.
_IN_MEMORY_BYTES = 64 << 20


def _read_verified(root: Path, record: ImageRecord) -> BinaryIO:
    """A private copy of the file's bytes, read once and hashed as they are read.

    featurize reads this copy, so the pixels are those of the bytes checked here. Raises
    ImageRejected when they are not the bytes the manifest hashed (the file was rewritten
    after the manifest was made); reading stops as soon as the file is longer than the
    manifest says. A missing file raises FileNotFoundError (a wrong root, not a bad image).
    """
    copy = io.BytesIO() if record.bytes <= _IN_MEMORY_BYTES else tempfile.TemporaryFile()
    digest, size = hashlib.sha256(), 0
    with open(root / record.relpath, "rb") as handle:
        while size <= record.bytes and (block := handle.read(1 << 20)):
            digest.update(block)
            copy.write(block)
            size += len(block)
    if size > record.bytes:
        copy.close()
        raise ImageRejected(f"changed during the run (longer than the manifest's {record.bytes} bytes)")
    if digest.hexdigest() != record.sha256:
        copy.close()
        raise ImageRejected(f"changed during the run (sha256 {digest.hexdigest()[:16]}… != manifest {record.sha256[:16]}…)")
    copy.seek(0)
    return copy


def write_shard(spec: ShardSpec, *, progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """Featurize the spec's images into one HDF5 shard at ``spec.uri``; return what it holds.

    Images the transform refuses are left out and listed in the result's quarantine. An
    existing complete shard for the same spec is returned as it is (a safe retry).
    ``progress(done, total)`` is called after every image.
    """
    if storage.exists(spec.uri):
        with storage.local_copy(spec.uri) as existing:
            found = _result_from_file(spec, existing)
        if found is not None:
            return found

    records, root = spec.records, Path(spec.root)
    features, kept, quarantine, shifted, stressed = [], [], [], [], []
    for done, record in enumerate(records, start=1):
        try:
            with _read_verified(root, record) as data:
                rows, shift_rows, stress_rows = _featurize_record(data, record, spec)
            features.append(rows)
            kept.append((record, len(rows)))
            if shift_rows is not None:
                shifted.append(shift_rows)
            if stress_rows is not None:
                stressed.append(stress_rows)
        except ImageRejected as error:
            quarantine.append(QuarantineEntry(relpath=record.relpath, stage="transform", reason=str(error)))
        if progress:
            progress(done, len(records))

    n_features = spec.transform.n_features
    matrix = np.concatenate(features) if features else np.zeros((0, n_features), np.float32)
    # Each image's rows: the image itself (0), then its renditions 1..K, all with its label and patient.
    labels = np.array([r.label for r, n in kept for _ in range(n)], dtype=np.uint8)
    renditions = np.array([i for _, n in kept for i in range(n)], dtype=np.uint8)
    relpaths = [r.relpath for r, n in kept for _ in range(n)]
    patient_ids = [r.patient_id for r, n in kept for _ in range(n)]
    shift_matrix = None
    if _with_shifts(spec):
        # (n_shifts, n, n_features): one slice per shift, like the clean features.
        shift_matrix = np.stack(shifted, axis=1) if shifted else np.zeros((len(shift.NAMES), 0, n_features), np.float32)
    stress_matrix = None
    if _with_stress(spec):
        stress_matrix = np.stack(stressed) if stressed else np.zeros((0, shift.STRESS_RENDITIONS, n_features), np.float32)
    with tempfile.TemporaryDirectory(prefix="pneumo-shard-") as tmp:
        local = Path(tmp, Path(spec.uri).name)
        _write_h5(local, spec, matrix, labels, relpaths, patient_ids, quarantine, renditions, shift_matrix, stress_matrix)
        sha256 = _sha256_file(local)
        storage.upload_file(local, spec.uri)
    return _result(spec, labels, renditions, sha256, quarantine)


def _with_shifts(spec: ShardSpec) -> bool:
    return spec.transform.shift_suite and spec.split != "train"


def _with_stress(spec: ShardSpec) -> bool:
    return spec.transform.shift_suite and spec.split == "val"


def _featurize_record(
    data: BinaryIO, record: ImageRecord, spec: ShardSpec
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One image's rows (itself, then its renditions when it is a train image), its shift-suite
    rows (val and test) and its stress rows (val).

    ``data`` is the file's verified bytes (``_read_verified``); each decode reads it from its start.

    The 'resample' method decodes once for all of them; the seed's methods compute the image's
    own row as always and decode again only for the shift suite (val and test).
    """
    config = spec.transform
    renditions = config.renditions if spec.split == "train" else 0
    shifts, stress = _with_shifts(spec), _with_stress(spec)
    if config.method != "resample" or not (renditions or shifts):
        rows = featurize(data, config)[None]
        gray = decode_gray(data, config) if shifts else None
    else:
        gray = decode_gray(data, config)
        rows = augment.rendition_features(gray, config, record.sha256, renditions)
    return (
        rows,
        shift.shift_features(gray, config, record.sha256) if shifts else None,
        shift.stress_features(gray, config, record.sha256) if stress else None,
    )


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
        "schema_version": SHARD_SCHEMA_VERSION,
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
                shifted = {}
                if "shift_features" in f:
                    names = json.loads(f.attrs["shift_names"])
                    shifted = dict(zip(names, f["shift_features"][:]))
                return ShardData(
                    features=f["features"][:],
                    labels=f["labels"][:],
                    relpaths=[s.decode() for s in f["relpaths"][:]],
                    patient_ids=[s.decode() for s in f["patient_ids"][:]],
                    renditions=f["renditions"][:] if "renditions" in f else None,  # schema 1: no renditions
                    shift=shifted,
                    stress=f["stress_features"][:] if "stress_features" in f else None,
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
        if shard.stress is not None:
            stressed.append(shard.stress)
        at += n
    shifted = {name: np.concatenate(parts) for name, parts in shifted.items()}
    if shifted and any(len(rows) != total for rows in shifted.values()):
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the shift suite")
    stress = np.concatenate(stressed) if stressed else None
    if stress is not None and len(stress) != total:
        raise CorruptShard(f"the {split} shards of {index_uri} do not all hold the stress val")
    return ShardData(
        features=features, labels=labels, relpaths=relpaths, patient_ids=patient_ids, renditions=renditions, shift=shifted,
        stress=stress,
    )
