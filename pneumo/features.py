"""Stage 3, one shard's images: each file read once and checked against the manifest, then featurized.

A train image gives its own row and, under a recipe with augmentation, its renditions'
(pneumo.augment); with the shift suite on, a val or test image also gives its rows under
each acquisition shift, and a val image its stress rows (pneumo.shift). The transform of one
image is pneumo.transform's; storing the rows is pneumo.shard_files's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from pneumo import augment, dicom, shift, views
from pneumo.config import TransformConfig
from pneumo.images import ImageRejected, decode_gray
from pneumo.manifest import ImageRecord, QuarantineEntry
from pneumo.shard_files import ShardData, with_film_bytes
from pneumo.transform import Resampler, borders, featurize

# Files up to this size are verified and featurized in memory; bigger ones go through a temporary file.
IN_MEMORY_BYTES = 64 << 20


def with_shifts(config: TransformConfig, split: str) -> bool:
    """Whether the images of ``split`` get shift-suite rows (val and test, with the suite on)."""
    return config.shift_suite and split != "train"


def with_stress(config: TransformConfig, split: str) -> bool:
    """Whether the images of ``split`` get stress rows (val, with the suite on)."""
    return config.shift_suite and split == "val"


def with_views(config: TransformConfig, split: str) -> bool:
    """Whether the images of ``split`` get their test-time views' rows (val and test, with views on)."""
    return config.views.count > 0 and split != "train"


def read_verified(root: Path, record: ImageRecord) -> BinaryIO:
    """A private copy of the file's bytes, read once and hashed as they are read.

    featurize reads this copy, so the pixels are those of the bytes checked here. Raises
    ImageRejected when they are not the bytes the manifest hashed (the file was rewritten
    after the manifest was made); reading stops as soon as the file is longer than the
    manifest says. A missing file raises FileNotFoundError (a wrong root, not a bad image).
    """
    copy = io.BytesIO() if record.bytes <= IN_MEMORY_BYTES else tempfile.TemporaryFile()
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


def featurize_record(
    data: BinaryIO, record: ImageRecord, config: TransformConfig, split: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, np.ndarray]]:
    """One image's rows (itself, then its renditions when it is a train image), its shift-suite
    rows (val and test), its stress rows (val), and with test-time views, its views' rows (val and
    test: ``views``) and those of its stress rows (val: ``stress_views``). A recipe that trims
    padding adds ``borders`` (the share of rows and columns trimmed, one pair per row) and, with
    the shift suite, ``shift_borders`` (one pair per shift): what a drift check sees of bars.

    ``data`` is the file's verified bytes (``read_verified``); each decode reads it from its start.

    The 'resample' method decodes once for all of them; the seed's methods compute the image's
    own row as always and decode again only for the shift suite (val and test).
    """
    renditions = config.renditions if split == "train" else 0
    shifts, stress, viewed = with_shifts(config, split), with_stress(config, split), with_views(config, split)
    if config.method != "resample" or not (renditions or shifts or viewed or config.trim_padding):
        rows = featurize(data, config)[None]
        gray = decode_gray(data, config) if shifts else None
    else:
        gray = decode_gray(data, config)
        rows = augment.rendition_features(gray, config, record.sha256, renditions)
    view_rows = {}
    if config.trim_padding:  # the same decode's border scan again: cheap beside the resampling
        view_rows["borders"] = np.tile(borders(gray, config), (len(rows), 1))
    shift_rows = None
    if shifts:
        shift_rows, shift_borders = shift.shift_rows(gray, config, record.sha256)
        if config.trim_padding:
            view_rows["shift_borders"] = shift_borders
    if viewed:
        picture = Resampler(gray, config)
        key = views.picture_key(picture)  # the picture's, not the file's: predict draws the same views for any copy
        view_rows["views"] = views.view_features(picture, config, key)
        if stress:
            view_rows["stress_views"] = views.jittered_view_features(picture, config, key, shift.stress_jitters(config, record.sha256))
    return (
        rows,
        shift_rows,
        shift.stress_features(gray, config, record.sha256) if stress else None,
        view_rows,
    )


def kept_copy(film: bytes) -> bytes:
    """The bytes a shard keeps of a val or test film: the file itself, or of a DICOM film its pixels only
    (``dicom.pixels_only``: its header's patient data must not reach the workdir)."""
    return dicom.pixels_only(film) if dicom.is_dicom(film[:132]) else film


def featurize_records(
    records: Sequence[ImageRecord],
    root: Path,
    config: TransformConfig,
    split: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ShardData, list[QuarantineEntry]]:
    """The rows of ``records`` (files under ``root``), and the images the transform refused, with why.

    ``progress(done, total)`` is called after every image.
    """
    features, kept, quarantine, shifted, stressed = [], [], [], [], []
    viewed: dict[str, list[np.ndarray]] = {"views": [], "stress_views": [], "borders": [], "shift_borders": []}
    films: list[bytes] = []
    for done, record in enumerate(records, start=1):
        try:
            with read_verified(root, record) as data:
                rows, shift_rows, stress_rows, view_rows = featurize_record(data, record, config, split)
                if with_film_bytes(config, split):
                    data.seek(0)
                    films.append(kept_copy(data.read()))
            for name, part in view_rows.items():
                viewed[name].append(part)
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
    rows = _rows(kept, features, shifted, stressed, config, split, viewed)
    return (dataclasses.replace(rows, films=films) if with_film_bytes(config, split) else rows), quarantine


def _rows(
    kept: list[tuple[ImageRecord, int]], features: list, shifted: list, stressed: list, config: TransformConfig, split: str,
    viewed: dict[str, list[np.ndarray]],
) -> ShardData:
    """The kept images' rows as one table: each image, then its renditions 1..K, with its label and patient."""
    n_features = config.n_features
    shift_rows = {}
    if with_shifts(config, split):
        # (n_shifts, n, n_features): one slice per shift, like the clean features.
        stacked = np.stack(shifted, axis=1) if shifted else np.zeros((len(shift.NAMES), 0, n_features), np.float32)
        shift_rows = dict(zip(shift.NAMES, stacked))
    stress = None
    if with_stress(config, split):
        stress = np.stack(stressed) if stressed else np.zeros((0, shift.STRESS_RENDITIONS, n_features), np.float32)
    joined = {}
    if config.trim_padding:
        joined["borders"] = np.concatenate(viewed["borders"]) if viewed["borders"] else np.zeros((0, 2), np.float32)
        if shift_rows:
            parts = viewed["shift_borders"]
            stacked = np.stack(parts, axis=1) if parts else np.zeros((len(shift.NAMES), 0, 2), np.float32)
            joined["shift_borders"] = dict(zip(shift.NAMES, stacked))
    if with_views(config, split):
        k, jitters = config.views.count, shift.STRESS_RENDITIONS
        joined["views"] = np.stack(viewed["views"]) if viewed["views"] else np.zeros((0, k, n_features), np.float32)
        if stress is not None:
            joined["stress_views"] = (np.stack(viewed["stress_views"]) if viewed["stress_views"]
                                      else np.zeros((0, jitters, k, n_features), np.float32))
    return ShardData(
        **joined,
        features=np.concatenate(features) if features else np.zeros((0, n_features), np.float32),
        labels=np.array([r.label for r, n in kept for _ in range(n)], dtype=np.uint8),
        relpaths=[r.relpath for r, n in kept for _ in range(n)],
        patient_ids=[r.patient_id for r, n in kept for _ in range(n)],
        renditions=np.array([i for _, n in kept for i in range(n)], dtype=np.uint8),
        shift=shift_rows,
        stress=stress,
    )
