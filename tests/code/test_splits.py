"""Final splits are carved by patient and stay put as data is added."""

from __future__ import annotations

import hashlib
from collections import defaultdict

from pneumo.config import SplitConfig
from pneumo.manifest import ImageRecord, Manifest
from pneumo.splits import assign_splits, records_by_split


def make_manifest(records: list[tuple[str, str, int, str]]) -> Manifest:
    return Manifest(
        root="/data",
        records=[
            ImageRecord(relpath=relpath, split=split, label=label, patient_id=patient, bytes=1, sha256=hashlib.sha256(relpath.encode()).hexdigest())
            for relpath, split, label, patient in records
        ],
    )


def train_only(n_patients: int, per_patient: int = 3) -> Manifest:
    rows = []
    for p in range(n_patients):
        for i in range(per_patient):
            rows.append((f"train/NORMAL/p{p}-{i}.jpeg", "train", p % 2, str(p)))
    return make_manifest(rows)


def test_no_patient_sits_in_two_splits():
    manifest = train_only(400)
    assignment = assign_splits(manifest)
    splits_of = defaultdict(set)
    for record in manifest.records:
        splits_of[record.patient_id].add(assignment[record.relpath])
    assert all(len(s) == 1 for s in splits_of.values())


def test_carved_fractions_follow_the_config():
    manifest = train_only(2000, per_patient=1)
    counts = defaultdict(int)
    for split in assign_splits(manifest, SplitConfig(val_fraction=0.1, test_fraction=0.2)).values():
        counts[split] += 1
    assert 150 <= counts["val"] <= 250
    assert 330 <= counts["test"] <= 470


def test_source_test_split_is_kept_and_tiny_val_is_folded_into_train():
    rows = [(f"train/NORMAL/a{p}.jpeg", "train", 0, str(p)) for p in range(300)]
    rows += [(f"val/NORMAL/v{p}.jpeg", "val", 0, str(1000 + p)) for p in range(8)]
    rows += [(f"test/NORMAL/t{p}.jpeg", "test", 0, str(2000 + p)) for p in range(50)]
    assignment = assign_splits(make_manifest(rows), SplitConfig(min_val_images=100))
    assert all(assignment[f"test/NORMAL/t{p}.jpeg"] == "test" for p in range(50))
    # No test images carved from train when the source has a test split.
    assert not any(assignment[f"train/NORMAL/a{p}.jpeg"] == "test" for p in range(300))
    # The 8 source val images are too few: they join train, and val is carved by patient.
    assert {assignment[f"val/NORMAL/v{p}.jpeg"] for p in range(8)} <= {"train", "val"}
    assert sum(v == "val" for v in assignment.values()) > 10


def test_a_large_source_val_split_is_kept():
    rows = [(f"train/NORMAL/a{p}.jpeg", "train", 0, str(p)) for p in range(300)]
    rows += [(f"val/NORMAL/v{p}.jpeg", "val", 0, str(1000 + p)) for p in range(120)]
    assignment = assign_splits(make_manifest(rows), SplitConfig(min_val_images=100))
    assert {assignment[f"val/NORMAL/v{p}.jpeg"] for p in range(120)} == {"val"}
    assert not any(assignment[f"train/NORMAL/a{p}.jpeg"] == "val" for p in range(300))


def test_adding_patients_never_moves_existing_ones():
    small, large = train_only(200), train_only(400)
    before, after = assign_splits(small), assign_splits(large)
    assert all(after[relpath] == split for relpath, split in before.items())


def test_records_by_split_is_sorted_and_complete():
    manifest = train_only(100)
    groups = records_by_split(manifest)
    assert sum(len(v) for v in groups.values()) == len(manifest.records)
    for records in groups.values():
        assert [r.relpath for r in records] == sorted(r.relpath for r in records)
