"""Prefect artifacts shared by the tasks."""

from __future__ import annotations

from typing import Iterable

from prefect.artifacts import create_table_artifact

from pneumo.manifest import QuarantineEntry, SkippedEntry


def quarantine_artifact(
    entries: Iterable[QuarantineEntry], *, key: str, skipped: Iterable[SkippedEntry] = ()
) -> None:
    """A table of the images that were set aside, each with its reason, then the OS metadata skipped."""
    rows = [entry.model_dump() for entry in entries]
    junk = [{"relpath": e.relpath, "stage": "skipped", "reason": e.reason} for e in skipped]
    description = f"{len(rows)} input file(s) quarantined, each with the reason"
    if junk:
        description += f"; {len(junk)} OS metadata file(s) skipped (stage 'skipped')"
    create_table_artifact(key=key, table=rows + junk, description=description)


def progress_logger(logger, what: str, every: int = 1000):
    """A ``progress(done, total)`` callback that logs every ``every`` items and at the end."""

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            logger.info("%s: %d/%d", what, done, total)

    return progress
