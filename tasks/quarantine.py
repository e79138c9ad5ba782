"""Reconcile inputs with shards, report what was quarantined, and stop a run on a broken source."""

from __future__ import annotations

from prefect import get_run_logger, task

from pneumo import quarantine, shard_files, storage, workdir as layout
from pneumo.manifest import ManifestRef, load_manifest
from tasks.caching import cache_policy
from tasks.reporting import quarantine_artifact
from tasks.retry import retry_options


@task(
    name="quarantine-report",
    **retry_options(),
    cache_policy=cache_policy(),
)
def report_quarantine(manifest: ManifestRef, index: shard_files.IndexRef, workdir: str, max_bad_fraction: float) -> str:
    """Write the quarantine report (JSON and artifact); fail if too much input was bad."""
    logger = get_run_logger()
    report = quarantine.build_report(load_manifest(manifest.uri), shard_files.read_index(index.uri))
    uri = storage.join(layout.reports(workdir), f"quarantine-{index.digest[:16]}.json")
    storage.write_bytes(uri, report.model_dump_json(indent=2).encode())
    logger.info(
        "%d input files: %d in shards, %d quarantined (%.2f%%) %s, %d skipped %s; report %s",
        report.n_inputs, report.n_in_shards, report.n_quarantined, 100 * report.bad_fraction, report.by_reason,
        report.n_skipped, report.skipped_by_reason, uri,
    )
    duplicates = report.duplicates
    logger.info(
        "duplicates: %d groups of identical files (%d files), %d near-copy pairs within %d bits; "
        "%d ties joined images the file names kept apart; %d pairs still on two sides of a split",
        duplicates.exact_groups, duplicates.exact_files, duplicates.near_pairs, duplicates.near_duplicate_bits,
        len(duplicates.joined), len(duplicates.across_splits),
    )
    for tie in duplicates.across_splits[:20]:
        logger.warning("%s on two sides (%s/%s, %d bits): %s and %s", tie.kind, *tie.splits, tie.distance, tie.a, tie.b)
    quarantine_artifact(report.entries, key="quarantine-report", skipped=report.skipped)
    quarantine.check_bad_fraction(report, max_bad_fraction)
    return uri
