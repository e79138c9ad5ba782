"""Prefect artifacts shared by the tasks."""

from __future__ import annotations

from typing import Iterable

from prefect.artifacts import create_table_artifact

from pneumo.manifest import QuarantineEntry


def quarantine_artifact(entries: Iterable[QuarantineEntry], *, key: str) -> None:
    """A table of the images that were set aside, each with its reason."""
    rows = [entry.model_dump() for entry in entries]
    create_table_artifact(
        key=key,
        table=rows,
        description=f"{len(rows)} input file(s) quarantined, each with the reason",
    )
