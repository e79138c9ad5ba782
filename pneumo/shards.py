"""Stage 3 as plain functions: plan the shards, write them, verify them, rebuild the broken ones, index them.

No Prefect here. ``run`` is the whole stage: in this process or a local process pool for
benchmarks, tests and anyone without Prefect, or, from the flow (flows/full.py
``shard_stage``), with the ``write-shard`` task (whose body is ``write_one``) mapped over
the flow's task runner for retries, caching and logging.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Optional

from pneumo import shard_files, storage, workdir as layout
from pneumo.config import SplitConfig, TransformConfig
from pneumo.manifest import load_manifest
from pneumo.pool import ProcessPool


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one manifest under one transform and split, and where their index goes."""

    specs: list[shard_files.ShardSpec]
    index_uri: str
    manifest_digest: str
    transform: TransformConfig
    split: SplitConfig


def plan(
    manifest_uri: str, root: str, split: SplitConfig, transform: TransformConfig, shard_size: int, workdir: str
) -> ShardPlan:
    """The specs of every shard under ``workdir``/shards, read from the manifest at ``manifest_uri``.

    ``root`` is the folder the images are in (a run's ManifestRef.root): the manifest file is
    shared by every copy of the same data and does not say which copy to read. Each spec
    carries its shard's records, so a shard task's inputs stay small.
    """
    manifest = load_manifest(manifest_uri, root)
    shards_root = layout.shards(workdir)
    digest = manifest.digest()
    return ShardPlan(
        specs=shard_files.plan_shards(manifest, split, transform, shard_size, shards_root),
        index_uri=shard_files.index_uri(shards_root, digest, transform, split, shard_size),
        manifest_digest=digest,
        transform=transform,
        split=split,
    )


def write_one(spec: shard_files.ShardSpec, pool: Optional[ProcessPool] = None) -> shard_files.ShardResult:
    """One shard, its pixel work done in ``pool``'s worker processes if given, else in this process.

    h5py holds a global lock, so threads alone do not scale: a pool is what makes it parallel.
    """
    return pool.run(shard_files.write_shard, spec) if pool else shard_files.write_shard(spec)


def write_all(
    specs: list[shard_files.ShardSpec],
    pool: Optional[ProcessPool] = None,
    on_done: Optional[Callable[[int, int], None]] = None,
) -> list[shard_files.ShardResult]:
    """Every shard, results in spec order: ``pool.workers`` at a time in ``pool``, else one by one here.

    ``on_done(done, total)`` is called as each shard is finished.
    """
    results: list[shard_files.ShardResult] = []
    if pool is None:
        for done, spec in enumerate(specs, start=1):
            results.append(write_one(spec))
            if on_done:
                on_done(done, len(specs))
        return results
    # One thread per worker process waits on its shard; the pixels are computed in the pool.
    with ThreadPoolExecutor(max_workers=pool.workers) as threads:
        futures = {threads.submit(write_one, spec, pool): i for i, spec in enumerate(specs)}
        by_position = {}
        for done, future in enumerate(as_completed(futures), start=1):
            by_position[futures[future]] = future.result()
            if on_done:
                on_done(done, len(specs))
    return [by_position[i] for i in range(len(specs))]


def set_aside_broken(
    specs: list[shard_files.ShardSpec], results: list[shard_files.ShardResult]
) -> list[tuple[shard_files.ShardSpec, str]]:
    """The shards whose files are missing or changed since ``results`` were made, with why.

    Their files are deleted, so that writing them again computes them afresh rather than
    returning the changed file. A cached result remembers a shard, not its file: a shard
    deleted or changed since it was written must be rebuilt, never trusted.
    """
    broken = []
    for spec, result in zip(specs, results):
        problem = shard_files.shard_problem(result.uri, result.sha256)
        if problem:
            storage.delete(result.uri)
            broken.append((spec, problem))
    return broken


def with_rebuilt(results: list[shard_files.ShardResult], rebuilt: list[shard_files.ShardResult]) -> list[shard_files.ShardResult]:
    """``results`` in their order, each replaced by its rebuilt result where there is one."""
    by_uri = {result.uri: result for result in rebuilt}
    return [by_uri.get(result.uri, result) for result in results]


def write_index(
    results: list[shard_files.ShardResult],
    index_uri: str,
    manifest_digest: str,
    transform: TransformConfig,
    split: SplitConfig,
) -> shard_files.IndexRef:
    """Write index.json over every shard and return what training needs of it."""
    shard_files.write_index(results, index_uri, manifest_digest=manifest_digest, transform=transform, split_config=split)
    return shard_files.index_ref(index_uri)


# Writes shards, results in spec order; ``rebuild`` is True for shards found broken (compute them afresh).
WriteShards = Callable[[list[shard_files.ShardSpec], bool], list[shard_files.ShardResult]]


def run(
    manifest_uri: str,
    root: str,
    split: SplitConfig,
    transform: TransformConfig,
    shard_size: int,
    workdir: str,
    workers: Optional[int] = None,
    on_done: Optional[Callable[[int, int], None]] = None,
    *,
    write: Optional[WriteShards] = None,
    index: Callable[..., shard_files.IndexRef] = write_index,
    on_broken: Optional[Callable[[shard_files.ShardSpec, str], None]] = None,
) -> shard_files.IndexRef:
    """The whole stage: plan, write, rebuild the shards found broken, index.

    By default the shards are written here (``workers`` processes; None: this process).
    The flow passes ``write``, its Prefect map of the write-shard task, and ``index``, its
    index task (same arguments as ``write_index``); ``on_broken(spec, problem)`` hears of
    each shard set aside for rebuilding.
    """
    shard_plan = plan(manifest_uri, root, split, transform, shard_size, workdir)
    with contextlib.ExitStack() as stack:
        if write is None:
            pool = stack.enter_context(ProcessPool(workers)) if workers else None
            write = lambda specs, rebuild: write_all(specs, pool, on_done)  # noqa: E731
        results = write(shard_plan.specs, False)
        # A cached or earlier result remembers a shard, not its file: one deleted or changed since is rebuilt.
        broken = set_aside_broken(shard_plan.specs, results)
        for spec, problem in broken:
            if on_broken:
                on_broken(spec, problem)
        if broken:
            results = with_rebuilt(results, write([spec for spec, _ in broken], True))
    return index(results, shard_plan.index_uri, shard_plan.manifest_digest, shard_plan.transform, shard_plan.split)
