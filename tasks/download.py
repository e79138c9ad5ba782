"""Task 1: fetch the dataset and write its manifest."""

from __future__ import annotations

from prefect import get_run_logger, task

from pneumo import download, workdir as layout
from pneumo.manifest import ManifestRef, save_manifest
from tasks.caching import cache_policy
from tasks.reporting import progress_logger
from tasks.retry import retry_options


@task(
    name="download",
    **retry_options(),
    cache_policy=cache_policy(),
)
def download_dataset(source: str, fingerprint: str, workdir: str, accept_lateral: bool = False) -> ManifestRef:
    """Fetch ``source`` into the workdir cache and write its manifest (lateral DICOM films kept if ``accept_lateral``).

    ``fingerprint`` is unused in the body: it is the cheap content fingerprint of the
    source, passed in so that the cache key changes exactly when the source does.
    """
    logger = get_run_logger()
    root = download.find_dataset_root(download.fetch(source, layout.downloads(workdir), progress=logger.info))
    logger.info("dataset root: %s", root)

    salt = layout.patient_salt(workdir)  # DICOM and table patient ids are written only hashed with it
    manifest = download.build_manifest(root, progress=progress_logger(logger, "files hashed"), salt=salt,
                                       accept_lateral=accept_lateral)
    uri = save_manifest(manifest, layout.manifests(workdir))
    ref = ManifestRef.from_manifest(manifest, uri)
    logger.info(
        "manifest %s: %d images, %d quarantined, %d OS metadata files skipped, counts %s",
        ref.digest[:12], ref.n_images, ref.n_quarantined, ref.n_skipped, ref.counts,
    )
    return ref
