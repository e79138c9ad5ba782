"""Task 2: image-size percentiles from headers, and the transform's target size."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from pneumo import sizes, storage, workdir as layout
from pneumo.manifest import ManifestRef, load_manifest
from tasks.caching import cache_policy
from tasks.reporting import progress_logger
from tasks.retry import retry_options


@task(
    name="size-percentiles",
    **retry_options(),
    cache_policy=cache_policy(),
)
def size_percentiles(manifest: ManifestRef, workdir: str, percentile: float) -> sizes.SizesRef:
    """Write width/height percentiles (overall and per class) and resolve the target size."""
    logger = get_run_logger()
    wanted = sizes.with_default_percentiles(percentile)

    progress = progress_logger(logger, "image headers read")
    stats = sizes.size_percentiles(load_manifest(manifest.uri, manifest.root), percentiles=wanted, progress=progress)
    uri = storage.join(layout.stats(workdir), f"sizes-{manifest.digest[:16]}.json")
    storage.write_bytes(uri, stats.model_dump_json(indent=2).encode())
    height, width = sizes.target_size(stats, percentile)
    logger.info("p%g size: %d x %d (height x width) from %d headers", percentile, height, width, stats.n)
    create_table_artifact(
        key="size-percentiles",
        table=sizes.table_rows(stats),
        description=f"Image sizes from headers; transform target is p{percentile:g} = {height} x {width} (h x w)",
    )
    return sizes.SizesRef(uri=uri, percentile=percentile, size=(height, width), n=stats.n)
