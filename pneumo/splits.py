"""Final train/val/test assignment, always by patient.

A patient's images never sit on two sides. Carved sets are chosen by a salted hash of
the patient id, not by a random draw: the same patient lands in the same set on every
run and in every dataset version, so adding data never moves a test patient into train.
"""

from __future__ import annotations

import hashlib

from pneumo.config import SplitConfig
from pneumo.manifest import ImageRecord, Manifest


def _patient_unit(patient_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the patient id."""
    digest = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(manifest: Manifest, config: SplitConfig | None = None) -> dict[str, str]:
    """Map every record's relpath to its final split.

    The source's test split is kept when it has images; otherwise test is carved from
    train. A source val split smaller than ``min_val_images`` is folded into train and
    val is carved by patient. A source's own splits are kept as the source made them.
    """
    config = config or SplitConfig()
    by_split = {"train": 0, "val": 0, "test": 0}
    for record in manifest.records:
        by_split[record.split] += 1
    has_test = by_split["test"] > 0
    has_val = by_split["val"] >= config.min_val_images

    out: dict[str, str] = {}
    for record in manifest.records:
        if record.split == "test":
            out[record.relpath] = "test"
        elif record.split == "val" and has_val:
            out[record.relpath] = "val"
        else:
            u = _patient_unit(record.patient_id, config.salt)
            if not has_test and u < config.test_fraction:
                out[record.relpath] = "test"
            elif not has_val and u >= 1.0 - config.val_fraction:
                out[record.relpath] = "val"
            else:
                out[record.relpath] = "train"
    return out


def records_by_split(manifest: Manifest, config: SplitConfig | None = None) -> dict[str, list[ImageRecord]]:
    """Records of each final split, sorted by relpath (the order shards are filled in)."""
    assignment = assign_splits(manifest, config)
    out: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for record in sorted(manifest.records, key=lambda r: r.relpath):
        out[assignment[record.relpath]].append(record)
    return out
