"""The shard stage on a real Dask cluster gives the very bytes a single thread gives."""

from __future__ import annotations

from pathlib import Path

from distributed import Client, LocalCluster, get_task_stream
from prefect import flow

from pneumo import shard_files, shards
from pneumo.config import SplitConfig, TransformConfig, seed_transform
from pneumo.download import build_manifest
from pneumo.manifest import save_manifest
from tests.helpers import shard_stage

SHARD_SIZE = 30  # 160 films: about 6 shards, several per worker


def run_shard_stage(source: Path, workdir: Path, runner: str, **runner_options) -> tuple[shard_files.IndexRef, int]:
    manifest = build_manifest(source)
    manifest_uri = save_manifest(manifest, str(workdir / "manifests"))
    transform, split = seed_transform(), SplitConfig()
    n_shards = len(shards.plan_shards(manifest, split, transform, SHARD_SIZE, str(workdir / "shards")))

    @flow
    def stage():
        return shard_stage(
            manifest_uri, split, transform, SHARD_SIZE, str(workdir), 0, runner, **runner_options, root=manifest.root
        )

    return stage(), n_shards


def test_two_dask_worker_processes_write_the_same_shards_as_one_thread(small_source, tmp_path):
    sequential, n_shards = run_shard_stage(small_source, tmp_path / "sequential", "threads", workers=1)

    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0")
    try:
        with Client(cluster) as client, get_task_stream(client) as stream:
            on_dask, _ = run_shard_stage(
                small_source, tmp_path / "dask", "dask", dask_address=cluster.scheduler_address
            )
        # Dask keys are the task function's name plus a hash.
        ran_on = [task["worker"] for task in stream.data if task["key"].startswith("write_shard-")]
    finally:
        cluster.close()

    # Every shard was written by the cluster's worker processes, and both of them took part.
    assert n_shards >= 4 and len(ran_on) == n_shards
    assert len(set(ran_on)) == 2
    # Same shard bytes, same index, same features.
    assert on_dask.counts == sequential.counts and on_dask.n_shards == n_shards
    assert [s["sha256"] for s in shard_files.read_index(on_dask.uri)["shards"]] == [
        s["sha256"] for s in shard_files.read_index(sequential.uri)["shards"]
    ]
    assert on_dask.digest == sequential.digest
    for split in ("train", "val", "test"):
        a, b = shard_files.load_split(on_dask.uri, split), shard_files.load_split(sequential.uri, split)
        assert len(a.labels) > 0
        assert a.features.tobytes() == b.features.tobytes() and a.relpaths == b.relpaths
