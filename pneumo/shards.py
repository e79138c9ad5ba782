"""Stage 3 as plain functions: plan the shards, write them, verify them, rebuild the broken ones, index them.

No Prefect here. ``run`` is the whole stage, in this process or a local process pool, for
benchmarks, tests and anyone without Prefect. The flow (flows/full.py) calls the same steps
itself: ``plan``, the ``write-shard`` task (whose body is ``write_one``) mapped over its
task runner, ``set_aside_broken`` and ``with_rebuilt``, then the ``write-shard-index`` task.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict

from pneumo import features, shard_files, storage, workdir as layout
from pneumo.config import SplitConfig, TransformConfig
from pneumo.manifest import SPLITS, Manifest, load_manifest
from pneumo.pool import ProcessPool
from pneumo.shard_files import IndexRef, ShardResult, ShardSpec
from pneumo.splits import records_by_split


class ShardPlan(BaseModel):
    """The shards of one manifest under one transform and split, and where their index goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specs: list[ShardSpec]
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
        specs=plan_shards(manifest, split, transform, shard_size, shards_root),
        index_uri=shard_files.index_uri(shards_root, digest, transform, split, shard_size),
        manifest_digest=digest,
        transform=transform,
        split=split,
    )


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
    folder = shard_files.shard_dir(out_dir, digest, transform, split_config, shard_size)
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


def write_shard(spec: ShardSpec, *, progress: Callable[[int, int], None] | None = None) -> ShardResult:
    """Featurize the spec's images into one HDF5 shard at ``spec.uri``; return what it holds.

    Images the transform refuses are left out and listed in the result's quarantine. An
    existing complete shard for the same spec is returned as it is (a safe retry).
    ``progress(done, total)`` is called after every image.
    """
    found = shard_files.finished_result(spec)
    if found is not None:
        return found
    data, quarantine = features.featurize_records(spec.records, Path(spec.root), spec.transform, spec.split, progress)
    return shard_files.write_file(spec, data, quarantine)


def write_one(spec: ShardSpec, pool: Optional[ProcessPool] = None) -> ShardResult:
    """One shard, its pixel work done in ``pool``'s worker processes if given, else in this process.

    h5py holds a global lock, so threads alone do not scale: a pool is what makes it parallel.
    """
    return pool.run(write_shard, spec) if pool else write_shard(spec)


def write_all(
    specs: list[ShardSpec],
    pool: Optional[ProcessPool] = None,
    on_done: Optional[Callable[[int, int], None]] = None,
) -> list[ShardResult]:
    """Every shard, results in spec order: ``pool.workers`` at a time in ``pool``, else one by one here.

    ``on_done(done, total)`` is called as each shard is finished.
    """
    results: list[ShardResult] = []
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


def set_aside_broken(specs: list[ShardSpec], results: list[ShardResult]) -> list[tuple[ShardSpec, str]]:
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


def with_rebuilt(results: list[ShardResult], rebuilt: list[ShardResult]) -> list[ShardResult]:
    """``results`` in their order, each replaced by its rebuilt result where there is one."""
    by_uri = {result.uri: result for result in rebuilt}
    return [by_uri.get(result.uri, result) for result in results]


def run(
    manifest_uri: str,
    root: str,
    split: SplitConfig,
    transform: TransformConfig,
    shard_size: int,
    workdir: str,
    workers: Optional[int] = None,
    on_done: Optional[Callable[[int, int], None]] = None,
) -> IndexRef:
    """The whole stage: plan, write (``workers`` processes; None: this process), rebuild the shards found broken, index.

    ``on_done(done, total)`` is called as each shard is finished.
    """
    shard_plan = plan(manifest_uri, root, split, transform, shard_size, workdir)
    with ProcessPool(workers) if workers else contextlib.nullcontext() as pool:
        results = write_all(shard_plan.specs, pool, on_done)
        # An earlier result remembers a shard, not its file: one deleted or changed since is rebuilt.
        broken = set_aside_broken(shard_plan.specs, results)
        if broken:
            results = with_rebuilt(results, write_all([spec for spec, _ in broken], pool, on_done))
    shard_files.write_index(results, shard_plan.index_uri, manifest_digest=shard_plan.manifest_digest,
                            transform=shard_plan.transform, split_config=shard_plan.split)
    return shard_files.index_ref(shard_plan.index_uri)
