"""The quarantine report: every input file is either in a shard or here, with its reason."""

from __future__ import annotations

import re
from collections import Counter

from pydantic import BaseModel

from pneumo.config import SplitConfig
from pneumo.manifest import Manifest, QuarantineEntry, SkippedEntry
from pneumo.splits import DuplicateReport, split_with_report


class TooMuchBadData(ValueError):
    """More of the input was quarantined than the run allows."""


class QuarantineReport(BaseModel):
    manifest_digest: str
    n_inputs: int  # every file of the split folders: in shards + quarantined + skipped
    n_in_shards: int
    n_quarantined: int
    bad_fraction: float  # (quarantined - out of scope) / (inputs - skipped - out of scope): neither is bad data
    by_reason: dict[str, int]  # reason (without per-file detail) -> files
    entries: list[QuarantineEntry]
    n_skipped: int = 0  # OS metadata (.DS_Store, ._*, __MACOSX/, Thumbs.db) left out on purpose
    skipped_by_reason: dict[str, int] = {}
    skipped: list[SkippedEntry] = []
    # The same film under two names: what was joined into one split, and pairs still apart.
    duplicates: DuplicateReport | None = None
    n_out_of_scope: int = 0  # quarantined as not frontal chest films (QuarantineEntry.out_of_scope): listed, not bad data


def _reason_kind(reason: str) -> str:
    # "too large: 30000x30000 pixels exceeds ..." -> "too large"; "corrupt JPEG (OSError: ...)" -> "corrupt JPEG"
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def build_report(manifest: Manifest, index: dict) -> QuarantineReport:
    """Reconcile the manifest with the shard index; raise if any input is unaccounted for."""
    entries = [*manifest.quarantine, *(QuarantineEntry(**entry) for entry in index["quarantine"])]
    n_in_shards = sum(sum(by_class.values()) for by_class in index["counts"].values())
    n_skipped = len(manifest.skipped)
    n_inputs = len(manifest.records) + len(manifest.quarantine) + n_skipped
    if n_in_shards + len(entries) + n_skipped != n_inputs:
        raise RuntimeError(
            f"accounting error: {n_inputs} input files, but {n_in_shards} in shards plus "
            f"{len(entries)} quarantined plus {n_skipped} skipped; rebuild the shards of manifest {manifest.digest()[:16]}"
        )
    n_out_of_scope = sum(entry.out_of_scope for entry in entries)
    candidates = n_inputs - n_skipped - n_out_of_scope
    return QuarantineReport(
        manifest_digest=manifest.digest(),
        n_inputs=n_inputs,
        n_in_shards=n_in_shards,
        n_quarantined=len(entries),
        n_out_of_scope=n_out_of_scope,
        bad_fraction=(len(entries) - n_out_of_scope) / candidates if candidates else 0.0,
        by_reason=dict(Counter(_reason_kind(e.reason) for e in entries).most_common()),
        entries=sorted(entries, key=lambda e: e.relpath),
        n_skipped=n_skipped,
        skipped_by_reason=dict(Counter(e.reason for e in manifest.skipped).most_common()),
        skipped=sorted(manifest.skipped, key=lambda e: e.relpath),
        duplicates=split_with_report(manifest, SplitConfig(**index["split_config"]))[1],
    )


def check_bad_fraction(report: QuarantineReport, max_bad_fraction: float) -> None:
    """Fail the run when too much of the input is bad: that is a broken source, not noise."""
    if report.bad_fraction > max_bad_fraction:
        bad = Counter(_reason_kind(e.reason) for e in report.entries if not e.out_of_scope).most_common(5)
        reasons = ", ".join(f"{kind} ({count})" for kind, count in bad)
        raise TooMuchBadData(
            f"{report.n_quarantined - report.n_out_of_scope} of {report.n_inputs - report.n_out_of_scope} input files "
            f"({report.bad_fraction:.1%}) were "
            f"quarantined, above the allowed {max_bad_fraction:.1%}. Most common reasons: {reasons}. "
            "Fix the source, or raise --run.max-bad-fraction if this much bad data is expected."
        )
