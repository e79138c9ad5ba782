"""Stage 3 storage: HDF5 shards that are deterministic, atomic, safe to retry, and checked on read."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pneumo import storage
from pneumo.config import TransformConfig
from pneumo.shard_files import (
    SHARD_SCHEMA_VERSION,
    CorruptShard,
    index_digest,
    index_uri,
    load_split,
    read_index,
    read_shard,
    write_index,
)
from pneumo.shards import plan_shards, write_shard
from pneumo.splits import records_by_split
from tests.helpers import NOT_A_JPEG, SHARD_SPLIT_CONFIG, SHARD_TRANSFORM

def _plan(shard_dataset, shard_size=5):
    manifest, manifest_uri, out_dir = shard_dataset
    return plan_shards(manifest, SHARD_SPLIT_CONFIG, SHARD_TRANSFORM, shard_size, out_dir)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_plan_covers_every_record_once_in_bounded_shards(shard_dataset):
    manifest = shard_dataset[0]
    specs = _plan(shard_dataset)

    assert specs == _plan(shard_dataset)  # deterministic
    by_split = records_by_split(manifest, SHARD_SPLIT_CONFIG)
    for split, records in by_split.items():
        mine = [s for s in specs if s.split == split]
        assert [s.number for s in mine] == list(range(len(mine)))
        assert [r for s in mine for r in records[s.start : s.stop]] == records
        assert all(0 < s.stop - s.start <= 5 for s in mine)
    assert all(Path(s.uri).name == f"{s.split}-{s.number:04d}.h5" for s in specs)
    assert len({Path(s.uri).parent for s in specs}) == 1
    assert Path(specs[0].uri).parent.name.startswith(manifest.digest()[:16])
    # Another shard size must not reuse the same file names for other images.
    assert Path(_plan(shard_dataset, shard_size=4)[0].uri).parent != Path(specs[0].uri).parent


def test_shard_holds_the_contract_and_quarantines_bad_images(shard_dataset):
    spec = next(s for s in _plan(shard_dataset, shard_size=100) if s.split == "train")
    records = records_by_split(shard_dataset[0], SHARD_SPLIT_CONFIG)["train"]
    result = write_shard(spec)

    assert [q.relpath for q in result.quarantine] == [NOT_A_JPEG]
    assert result.quarantine[0].stage == "transform"
    assert result.quarantine[0].reason == "not an image (cannot identify image file)"
    kept = [r for r in records if r.relpath != NOT_A_JPEG]
    assert result.count == len(kept)
    assert result.class_counts == {"NORMAL": sum(r.label == 0 for r in kept), "PNEUMONIA": sum(r.label == 1 for r in kept)}
    assert result.sha256 == _sha256(spec.uri)

    with h5py.File(spec.uri, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (len(kept), 140)
        assert f["labels"].dtype == np.uint8
        assert h5py.check_string_dtype(f["relpaths"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["patient_ids"].dtype).encoding == "utf-8"
        assert TransformConfig.model_validate_json(f.attrs["transform"]) == SHARD_TRANSFORM
        assert f.attrs["manifest_digest"] == spec.manifest_digest
        assert f.attrs["schema_version"] == SHARD_SCHEMA_VERSION
        assert f.attrs["split"] == "train"

    data = read_shard(spec.uri, expected_sha256=result.sha256)
    assert data.relpaths == [r.relpath for r in kept]
    assert data.patient_ids == [r.patient_id for r in kept]
    assert data.labels.tolist() == [r.label for r in kept]
    assert 0.0 <= data.features.min() and data.features.max() <= 1.0


def test_same_inputs_give_the_same_bytes(shard_dataset, tmp_path):
    spec = _plan(shard_dataset)[0]
    first = write_shard(spec)
    time.sleep(1.1)  # HDF5 creation times have one-second resolution: a timestamped file would now differ
    elsewhere = spec.model_copy(update={"uri": str(tmp_path / "copy" / "train-0000.h5")})
    second = write_shard(elsewhere)
    assert first.sha256 == second.sha256 == _sha256(spec.uri) == _sha256(elsewhere.uri)


def test_finished_shard_is_returned_without_recomputing(shard_dataset):
    spec = next(s for s in _plan(shard_dataset, shard_size=100) if s.split == "train")
    first = write_shard(spec)
    Path(shard_dataset[0].root).rename(Path(shard_dataset[0].root).with_name("moved"))  # recomputing would now fail

    assert write_shard(spec) == first  # quarantine included: it is stored in the shard


def test_a_stale_or_foreign_file_at_the_target_is_replaced(shard_dataset):
    spec = _plan(shard_dataset)[0]
    Path(spec.uri).parent.mkdir(parents=True)
    Path(spec.uri).write_bytes(b"left over from a crash")
    result = write_shard(spec)
    assert read_shard(spec.uri, result.sha256).features.shape[0] == result.count


def test_target_appears_only_when_complete(shard_dataset):
    spec = _plan(shard_dataset)[0]
    folder = Path(spec.uri).parent
    seen = []

    def progress(done, total):
        seen.append(Path(spec.uri).exists())

    write_shard(spec, progress=progress)
    assert seen and not any(seen)
    assert sorted(os.listdir(folder)) == [Path(spec.uri).name]  # no temporary file left beside it


def test_a_failed_write_leaves_nothing_behind(shard_dataset):
    spec = _plan(shard_dataset)[0]
    manifest = shard_dataset[0]
    victim = records_by_split(manifest, SHARD_SPLIT_CONFIG)[spec.split][spec.stop - 1]
    (Path(manifest.root) / victim.relpath).unlink()  # a missing file is an error, not a bad image

    with pytest.raises(FileNotFoundError):
        write_shard(spec)
    assert not Path(spec.uri).exists()
    assert not Path(spec.uri).parent.exists() or os.listdir(Path(spec.uri).parent) == []


def test_a_shard_task_needs_its_spec_only_not_the_manifest(shard_dataset):
    manifest, manifest_uri, out_dir = shard_dataset
    spec = _plan(shard_dataset)[0]
    Path(manifest_uri).unlink()  # memory bounded by the shard: the manifest is never read
    result = write_shard(spec)
    assert result.count == len(spec.records) == spec.stop - spec.start


def test_index_lists_shards_counts_and_quarantine(shard_dataset):
    manifest, _, out_dir = shard_dataset
    results = [write_shard(spec) for spec in _plan(shard_dataset)]
    uri = index_uri(out_dir, manifest.digest(), SHARD_TRANSFORM, SHARD_SPLIT_CONFIG, 5)

    assert write_index(results[::-1], uri, manifest_digest=manifest.digest(), transform=SHARD_TRANSFORM, split_config=SHARD_SPLIT_CONFIG) == uri
    index = read_index(uri)

    assert [s["name"] for s in index["shards"]] == [Path(r.uri).name for r in results]
    assert [s["sha256"] for s in index["shards"]] == [r.sha256 for r in results]
    assert index["manifest_digest"] == manifest.digest() and index["schema_version"] == SHARD_SCHEMA_VERSION
    assert [q["relpath"] for q in index["quarantine"]] == [NOT_A_JPEG]
    by_split = records_by_split(manifest, SHARD_SPLIT_CONFIG)
    for split, records in by_split.items():
        kept = [r for r in records if r.relpath != NOT_A_JPEG]
        assert index["counts"][split] == {"NORMAL": sum(r.label == 0 for r in kept), "PNEUMONIA": sum(r.label == 1 for r in kept)}

        data = load_split(uri, split)
        assert data.relpaths == [r.relpath for r in kept]
        assert data.features.shape == (len(kept), 140)
        parts = [read_shard(r.uri) for r in results if r.split == split]
        if parts:
            np.testing.assert_array_equal(data.features, np.concatenate([p.features for p in parts]))

    digest = index_digest(uri)
    write_index(results, uri, manifest_digest=manifest.digest(), transform=SHARD_TRANSFORM, split_config=SHARD_SPLIT_CONFIG)
    assert index_digest(uri) == digest  # rewriting the same index changes nothing


def test_a_flipped_byte_is_detected(shard_dataset):
    spec = _plan(shard_dataset)[0]
    result = write_shard(spec)
    data = bytearray(Path(spec.uri).read_bytes())
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(spec.uri, bytes(data))

    with pytest.raises(CorruptShard, match="delete it and run the transform again"):
        read_shard(spec.uri, expected_sha256=result.sha256)


def test_a_trimming_transform_stores_each_films_trimmed_padding_and_its_older_shards_are_written_again(shard_dataset):
    from pneumo import shift
    from pneumo.config import recipe
    from pneumo.images import decode_gray
    from pneumo.shard_files import BORDERS_SCHEMA_VERSION, finished_result
    from pneumo.transform import borders

    manifest, _, out_dir = shard_dataset
    trimmed = recipe("robust3").transform.model_copy(update={"size": (100, 130), "renditions": 2})
    specs = plan_shards(manifest, SHARD_SPLIT_CONFIG, trimmed, 100, out_dir)
    train, test = (next(s for s in specs if s.split == split) for split in ("train", "test"))
    result = write_shard(train)
    data = read_shard(train.uri, result.sha256)
    assert data.borders.dtype == np.float32 and data.borders.shape == (len(data.labels), 2)
    films = data.originals()
    for relpath, figure in zip(films.relpaths, films.borders):  # the transform's own figure; a rendition repeats it
        np.testing.assert_array_equal(figure, borders(decode_gray(Path(train.root) / relpath, trimmed), trimmed))
        assert (data.borders[[r == relpath for r in data.relpaths]] == figure).all()
    with h5py.File(train.uri, "r") as f:
        assert f.attrs["schema_version"] == BORDERS_SCHEMA_VERSION == 4
    shifted = read_shard(write_shard(test).uri)
    assert set(shifted.shift_borders) == set(shift.NAMES) and shifted.borders.shape == (len(shifted.labels), 2)
    assert (shifted.shift_borders["letterbox"][:, 0] > 0.1).all() and (shifted.shift_borders["pillarbox"][:, 1] > 0.1).all()
    np.testing.assert_array_equal(shifted.shift_borders["zoom_0.9"], shifted.borders)  # a warp trims what the film has
    # A shard written before the borders (schema 3) is not taken as finished: it is written again, with them.
    with h5py.File(train.uri, "a") as f:
        del f["borders"]
        f.attrs["schema_version"] = SHARD_SCHEMA_VERSION
    assert read_shard(train.uri).borders is None  # it still reads
    assert finished_result(train) is None
    assert read_shard(write_shard(train).uri).borders is not None
    # A transform that trims nothing keeps schema 3 and stores no borders.
    plain = next(s for s in _plan(shard_dataset) if s.split == "train")
    write_shard(plain)
    with h5py.File(plain.uri, "r") as f:
        assert f.attrs["schema_version"] == SHARD_SCHEMA_VERSION == 3 and "borders" not in f
    assert read_shard(plain.uri).borders is None

def test_a_views_shard_keeps_its_films_bytes_and_one_written_without_them_is_rewritten(shard_dataset):
    """Val and test shards of a recipe with views keep each film's bytes (the evaluation makes the shift
    suite's views from them); a shard of earlier code, without them, is not taken as finished."""
    from pneumo.config import ViewConfig, recipe

    manifest, _, out_dir = shard_dataset
    transform = recipe("robust4").transform.model_copy(update={"size": (100, 130), "renditions": 0, "views": ViewConfig(count=2)})
    spec = next(s for s in plan_shards(manifest, SHARD_SPLIT_CONFIG, transform, 100, out_dir) if s.split == "val")
    first = write_shard(spec)
    data = read_shard(spec.uri, first.sha256)
    assert data.films and data.films == [(Path(spec.root) / relpath).read_bytes() for relpath in data.relpaths]
    with h5py.File(spec.uri, "a") as f:
        del f["film_bytes"]  # as the code before the films' bytes wrote it
    again = write_shard(spec)
    assert read_shard(spec.uri, again.sha256).films == data.films
    assert again.sha256 == first.sha256  # rewritten, the same bytes as before
    seed_val = next(s for s in _plan(shard_dataset, shard_size=100) if s.split == "val")
    assert read_shard(write_shard(seed_val).uri).films is None  # no views: no bytes
