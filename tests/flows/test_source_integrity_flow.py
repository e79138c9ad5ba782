"""The right pixels through the whole flow: two copies of one dataset, and a file rewritten in place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import ROBUST3
from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo import shard_files
from pneumo.config import TrainConfig, TransformConfig
from pneumo.transform import featurize
from tests.helpers import copy_patient_subset

QUICK = {"epochs": 2, "patience": 2}


def run(source: Path, workdir: Path, **options):
    state = full(
        source=str(source), workdir=str(workdir), train=QUICK, runner="threads", workers=1,
        return_state=True, **{**ROBUST3, **options},
    )
    assert state.is_completed(), state.message
    return state.result()


def features_by_relpath(index_uri: str) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val", "test"):
        part = shard_files.load_split(index_uri, split).originals()  # renditions repeat an image's relpath
        out.update(zip(part.relpaths, part.features))
    return out


def assert_shards_hold_the_pixels_of(root: Path, summary: dict) -> None:
    config = TransformConfig.stored(shard_files.read_index(summary["shards_index"])["transform"])
    features = features_by_relpath(summary["shards_index"])
    assert sorted(features) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    for relpath, row in features.items():
        np.testing.assert_array_equal(row, featurize(root / relpath, config), err_msg=relpath)


@pytest.fixture
def small_source(shared_data, tmp_path) -> Path:
    """About 40 real images, whole patients."""
    return copy_patient_subset(shared_data, tmp_path / "A", per_class=20)


def test_a_run_reads_its_own_source_never_an_identical_copy(small_source, tmp_path):
    a, b = small_source, tmp_path / "B"
    shutil.copytree(a, b)
    workdir = tmp_path / "work"
    first = run(a, workdir, shard_size=25)
    second = run(b, workdir, shard_size=25)
    assert second["dataset_version"] == first["dataset_version"]  # one shared manifest file

    # B changes; A does not. New shards for A must still come from A's files.
    for path in (b / "train" / "NORMAL").iterdir():
        with Image.open(path) as image:
            inverted = ImageOps.invert(image.convert("L"))
        inverted.save(path, quality=95)
    again = run(a, workdir, shard_size=20)
    assert again["dataset_version"] == first["dataset_version"]
    assert again["quarantined"] == 0
    assert_shards_hold_the_pixels_of(a, again)

    # With B gone, A still runs: nothing of A's run points into B.
    shutil.rmtree(b)
    last = run(a, workdir, shard_size=15)
    assert_shards_hold_the_pixels_of(a, last)


def test_a_same_size_rewrite_is_quarantined_and_verify_source_reads_it(small_source, tmp_path):
    a = small_source
    victim = a / "train" / "NORMAL" / "IM-9001-0001.bmp"
    with Image.open(next((a / "train" / "NORMAL").iterdir())) as image:
        picture = image.convert("L")
    picture.save(victim)  # BMP: the same dimensions always take the same number of bytes
    workdir = tmp_path / "work"
    first = run(a, workdir, shard_size=25, max_bad_fraction=0.1)

    info = victim.stat()
    ImageOps.invert(picture).save(victim)
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))  # as `touch -r`, `cp -p` or rsync -t leave it
    assert victim.stat().st_size == info.st_size

    # The cheap fingerprint sees nothing: the manifest is reused, and new shards refuse the
    # file whose bytes are no longer the ones it hashed, instead of featurizing them.
    cheap = run(a, workdir, shard_size=20, max_bad_fraction=0.1)
    assert cheap["dataset_version"] == first["dataset_version"]
    report = json.loads(Path(cheap["quarantine_report"]).read_text())
    assert [(e["relpath"], e["reason"].split(" (")[0]) for e in report["entries"]] == [
        ("train/NORMAL/IM-9001-0001.bmp", "changed during the run")
    ]

    # --verify-source hashes every file: a new dataset version, holding the new pixels.
    verified = run(a, workdir, shard_size=20, max_bad_fraction=0.1, verify_source=True)
    assert verified["dataset_version"] != first["dataset_version"]
    assert verified["quarantined"] == 0
    assert_shards_hold_the_pixels_of(a, verified)
