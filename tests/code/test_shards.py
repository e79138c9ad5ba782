"""The shard stage as library functions, without Prefect: plan, write, verify and rebuild, index."""

from __future__ import annotations

from pathlib import Path

from pneumo import shard_files, shards, storage
from pneumo.shard_files import read_index
from tests.helpers import SHARD_SPLIT_CONFIG, SHARD_TRANSFORM

SHARD_SIZE = 5


def test_a_process_pool_writes_the_very_shards_this_process_writes(shard_dataset, tmp_path):
    manifest, manifest_uri, _ = shard_dataset
    args = (manifest_uri, manifest.root, SHARD_SPLIT_CONFIG, SHARD_TRANSFORM, SHARD_SIZE)
    progress = []
    here = shards.run(*args, str(tmp_path / "here"))
    pooled = shards.run(*args, str(tmp_path / "pooled"), workers=2, on_done=lambda *p: progress.append(p))

    n_shards = len(shards.plan(*args, str(tmp_path / "here")).specs)
    assert n_shards >= 4 and here.n_shards == pooled.n_shards == n_shards
    assert sorted(progress) == [(done, n_shards) for done in range(1, n_shards + 1)]
    assert here.uri.startswith(str(tmp_path / "here" / "shards")) and storage.exists(pooled.uri)
    # Same bytes in every shard, so the same index: the features a model trains on do not depend on the pool.
    assert [s["sha256"] for s in read_index(pooled.uri)["shards"]] == [s["sha256"] for s in read_index(here.uri)["shards"]]
    assert pooled.digest == here.digest and pooled.counts == here.counts
    assert pooled.n_quarantined == here.n_quarantined == 1  # the one file that is not a JPEG


def test_a_shard_changed_or_deleted_after_writing_is_set_aside_and_rebuilt(shard_dataset, tmp_path):
    manifest, manifest_uri, _ = shard_dataset
    plan = shards.plan(manifest_uri, manifest.root, SHARD_SPLIT_CONFIG, SHARD_TRANSFORM, SHARD_SIZE, str(tmp_path))
    results = shards.write_all(plan.specs)
    assert [r.uri for r in results] == [s.uri for s in plan.specs]
    assert shards.set_aside_broken(plan.specs, results) == []

    changed, deleted = Path(plan.specs[0].uri), Path(plan.specs[2].uri)
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still an HDF5 file, most likely: only the sha256 tells
    changed.write_bytes(bytes(data))
    deleted.unlink()

    broken = shards.set_aside_broken(plan.specs, results)
    assert [spec.uri for spec, _ in broken] == [str(changed), str(deleted)]
    assert broken[0][1].startswith("bytes changed since it was written") and broken[1][1] == "missing"
    assert not changed.exists()  # set aside, so writing it again computes it rather than returning the changed file

    rebuilt = shards.with_rebuilt(results, shards.write_all([spec for spec, _ in broken]))
    assert rebuilt == results  # deterministic: the rebuilt shards are the very bytes first written
    assert shards.set_aside_broken(plan.specs, rebuilt) == []
    shard_files.write_index(rebuilt, plan.index_uri, manifest_digest=plan.manifest_digest, transform=plan.transform,
                            split_config=plan.split)
    index = shard_files.index_ref(plan.index_uri)
    assert index.n_shards == len(plan.specs) and index.uri == plan.index_uri
