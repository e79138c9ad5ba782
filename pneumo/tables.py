"""Sources whose labels sit in a table: the RSNA layout as it is, and a generic ``labels.csv``.

A source folder (or the folder a zip or S3 prefix unpacks to) is a table source when it
holds one of TABLES; it is found and read without any option (``--source /data/rsna``):
the table is part of the dataset, like the Kaggle set's class folders, so a zip or an S3
prefix of it works the same way and nothing else has to be kept in step with it.

- RSNA (``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``): the films are
  ``stage_2_train_images/{patientId}.dcm`` (or ``{patientId}.dcm`` beside the table). A film
  has one row per box: its rows collapse to one label (Target 1 -> PNEUMONIA); rows of one
  film that disagree on Target refuse the film. Every film is in ``train`` (val and test are
  carved by patient). The unlabelled ``stage_2_test_images/`` is not read.
- generic (``labels.csv``: ``path,label[,patient][,split]``): ``path`` relative to the table's
  folder, ``label`` NORMAL/PNEUMONIA (any case) or 0/1, ``patient`` any id (hashed before it
  is written), ``split`` train/val/test (default train).

Refused with the file named (a QuarantineEntry): unknown labels or splits, rows naming a
missing file or a path outside the folder, duplicate rows of one file (generic) or
conflicting rows (RSNA), and image files without a row. A table that cannot be read at all
(no header, wrong columns) is a ValueError for the whole source.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pneumo.manifest import CLASSES, SPLITS

RSNA_TABLE = "stage_2_train_labels.csv"
RSNA_IMAGES = "stage_2_train_images"
GENERIC_TABLE = "labels.csv"
TABLES = (RSNA_TABLE, GENERIC_TABLE)
RSNA_COLUMNS = ("patientId", "Target")
GENERIC_COLUMNS = ("path", "label")
MAX_TABLE_BYTES = 200_000_000  # RSNA's table is 1.5 MB; a bound so a hostile table cannot exhaust memory


@dataclass
class Row:
    relpath: str  # POSIX, relative to the source root
    label: int
    split: str = "train"
    patient: str | None = None  # as given by the table (in clear: hashed before it is written)


@dataclass
class Table:
    """What a table says: the labelled files, the refusals (relpath, reason), the folders whose files it covers."""

    name: str
    rows: dict[str, Row] = field(default_factory=dict)
    refused: list[tuple[str, str]] = field(default_factory=list)
    image_folder: str = ""  # relpath of the folder whose unlisted files are "without a row" ("" = the whole root)


def table_in(folder: Path) -> Path | None:
    """The labels table directly in ``folder``, or None; two kinds at once is an error."""
    found = [folder / name for name in TABLES if (folder / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder} holds both {RSNA_TABLE} and {GENERIC_TABLE}; keep the one that labels the films")
    return found[0] if found else None


def _reader(path: Path, required: tuple[str, ...]) -> csv.DictReader:
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise ValueError(f"{path.name}: larger than {MAX_TABLE_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path.name}: no column {', '.join(missing)} (columns: {', '.join(reader.fieldnames or []) or 'none'})")
    return reader


def read_table(path: Path) -> Table:
    """The rows of the table at ``path`` (one of TABLES), checked; ValueError when it cannot be read at all."""
    return _read_rsna(path) if path.name == RSNA_TABLE else _read_generic(path)


def _read_rsna(path: Path) -> Table:
    root = path.parent
    folder = RSNA_IMAGES if (root / RSNA_IMAGES).is_dir() else ""
    table = Table(name=path.name, image_folder=folder)
    targets: dict[str, set[str]] = {}
    for line, row in enumerate(_reader(path, RSNA_COLUMNS), start=2):
        patient, target = (row.get("patientId") or "").strip(), (row.get("Target") or "").strip()
        relpath = (PurePosixPath(folder) / f"{patient}.dcm").as_posix() if patient else f"(line {line})"
        if not patient or "/" in patient or "\\" in patient or patient.startswith("."):
            table.refused.append((relpath, f"{path.name} line {line}: patientId {'missing' if not patient else 'is not a file name'}"))
            continue
        targets.setdefault(relpath, set()).add(target)
    for relpath, values in targets.items():
        if len(values) > 1:
            table.refused.append((relpath, f"conflicting rows in {path.name}: Target {' and '.join(sorted(values))}"))
        elif (target := next(iter(values))) not in ("0", "1"):
            table.refused.append((relpath, f"unknown label in {path.name}: Target {target[:20]!r} (expected 0 or 1)"))
        else:
            table.rows[relpath] = Row(relpath=relpath, label=int(target), patient=None)  # the patient is the header's
    return table


def _label(value: str) -> int | None:
    value = value.strip().upper()
    if value in CLASSES:
        return CLASSES.index(value)
    return int(value) if value in ("0", "1") else None


def _read_generic(path: Path) -> Table:
    table = Table(name=path.name)
    seen: dict[str, int] = {}
    for line, row in enumerate(_reader(path, GENERIC_COLUMNS), start=2):
        given = (row.get("path") or "").strip().replace("\\", "/")
        pure = PurePosixPath(given)
        if not given or pure.is_absolute() or ".." in pure.parts:
            table.refused.append((given or f"(line {line})", f"{path.name} line {line}: path outside the source folder"))
            continue
        relpath = pure.as_posix()
        seen[relpath] = seen.get(relpath, 0) + 1
        label, split = _label(row.get("label") or ""), (row.get("split") or "train").strip().lower()
        if label is None:
            reason = f"unknown label in {path.name}: {(row.get('label') or '')[:20]!r} (expected NORMAL, PNEUMONIA, 0 or 1)"
        elif split not in SPLITS:
            reason = f"unknown split in {path.name}: {split[:20]!r} (expected train, val or test)"
        else:
            table.rows.setdefault(relpath, Row(relpath, label, split, (row.get("patient") or "").strip() or None))
            continue
        table.refused.append((relpath, reason))
    for relpath, count in seen.items():
        if count > 1:  # which of the rows is right cannot be known: the file is refused
            table.rows.pop(relpath, None)
            table.refused.append((relpath, f"duplicate rows in {path.name}: {count} rows name this file"))
    refused = {relpath for relpath, _ in table.refused}
    table.rows = {relpath: row for relpath, row in table.rows.items() if relpath not in refused}
    return table
