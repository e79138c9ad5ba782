"""Expectations about the real Kaggle train split in ../shared/data/chest_xray_224."""

from __future__ import annotations

import time
import pytest

from pneumo.download import build_manifest, find_dataset_root, parse_patient_id

# One xdist worker runs the whole module, so that its module fixture (manifest) is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_shared_dataset")]  # slow: hashes all 5,216 films


@pytest.fixture(scope="module")
def manifest(shared_data):
    """shared_data (tests/conftest.py) skips with a clear message when the folder is missing."""
    started = time.perf_counter()
    result = build_manifest(find_dataset_root(shared_data))
    print(f"build_manifest: {len(result.records)} images in {time.perf_counter() - started:.2f} s")
    return result


def test_train_split_has_the_kaggle_counts(manifest):
    assert manifest.counts() == {"train": {"NORMAL": 1341, "PNEUMONIA": 3875}}
    assert manifest.quarantine == []


def test_every_hash_matches_sha256sums(shared_data, manifest):
    expected = {}
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, relpath = line.split(maxsplit=1)
        expected[relpath.lstrip("*")] = digest
    assert {r.relpath: r.sha256 for r in manifest.records} == expected


def test_every_file_name_carries_a_patient_id(manifest):
    fallbacks = [r.relpath for r in manifest.records if not r.patient_id.isdigit()]
    assert fallbacks == []
    assert all(r.patient_id == parse_patient_id(r.relpath) for r in manifest.records)


def test_both_classes_have_many_patients(manifest):
    normal = {r.patient_id for r in manifest.records if r.label == 0}
    pneumonia = {r.patient_id for r in manifest.records if r.label == 1}
    print(f"patients: {len(normal)} NORMAL, {len(pneumonia)} PNEUMONIA, {len(normal & pneumonia)} in both")
    assert len(normal) > 100 and len(pneumonia) > 100
    # Several images per patient on average in PNEUMONIA (personN_bacteria_1, _2, ...).
    assert len(pneumonia) < 3875
