"""Task 3: transform images into HDF5 shards (mapped, one task per shard), then index them."""

from __future__ import annotations

import time
from typing import Optional

from prefect import get_run_logger, task

from pneumo import shards, shard_files
from pneumo.pool import ProcessPool
from tasks import progress
from tasks.caching import cache_policy
from tasks.retry import retry_options


@task(
    name="write-shard",
    **retry_options(),
    # Where the pixels are computed does not change the shard.
    cache_policy=cache_policy(ignore=("pool",)),
)
def write_shard(spec: shard_files.ShardSpec, pool: Optional[ProcessPool] = None) -> shard_files.ShardResult:
    """Featurize one shard's images and write the shard atomically, in ``pool`` if given."""
    logger = get_run_logger()
    started = time.perf_counter()
    result = shards.write_one(spec, pool)
    seconds = time.perf_counter() - started
    progress.advance("transform-progress", result.count + len(result.quarantine))
    logger.info(
        "%s-%04d: %d images, %d quarantined, %.1fs (%.0f images/s)",
        spec.split, spec.number, result.count, len(result.quarantine), seconds,
        (result.count + len(result.quarantine)) / max(seconds, 1e-9),
    )
    return result


@task(
    name="write-shard-index",
    **retry_options(),
    cache_policy=cache_policy(),
)
def write_index(plan: shards.ShardPlan, results: list[shard_files.ShardResult]) -> shard_files.IndexRef:
    """Write index.json over every shard of ``plan``."""
    ref = shards.write_index(results, plan.index_uri, plan.manifest_digest, plan.transform, plan.split)
    get_run_logger().info("index %s: %d shards, counts %s", plan.index_uri, len(results), ref.counts)
    return ref
