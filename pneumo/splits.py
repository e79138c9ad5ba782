"""Final train/val/test assignment, by patient and by content.

A patient, and a film copied in the ways pneumo/duplicates.py finds, never sit on two sides
(other edits of a film can still escape; docs/data.md lists which). Images are grouped first: one patient's images (the id
parsed from the file name), byte-identical files (same sha256) and near copies (perceptual
fingerprints within ``SplitConfig.near_duplicate_bits``, pneumo/duplicates.py: as they are,
one against the other's mirror image, and a train image against a held-out film's turned
and cropped prints) all tie images together, and a group of tied images moves as one. So a
copy renamed ``Copy of IM-0119-0001.jpeg`` (its own "patient") or re-saved smaller goes where its
original goes.

Carved sets are chosen by a salted hash of the patient id, not by a random draw: the same
patient lands in the same set on every run and in every dataset version. A group takes
the smallest hash of its patients, so a patient carved into test stays in test when a copy
joins it. A source's own test and val splits are kept as the source made them (their
patient numbers are not the train split's), but a copy of one of their films found in
the carved pool joins it there: test first, then val.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from pydantic import BaseModel

from pneumo import duplicates
from pneumo.config import SplitConfig
from pneumo.manifest import ImageRecord, Manifest

HELD = ("test", "val")  # source splits that keep their images, most held out first


class Tie(BaseModel):
    """Two images of one film that the patient ids alone would have kept apart."""

    a: str  # relpath
    b: str
    # "same bytes" (sha256), or by fingerprint distance: "near copy", "mirrored copy", "turned or cropped copy"
    kind: str
    distance: int  # fingerprint bits (0 for the same bytes)
    splits: tuple[str, str]  # final splits of a and b


class DuplicateReport(BaseModel):
    """What grouping by content did to the splits; part of the quarantine/data report."""

    near_duplicate_bits: int
    exact_groups: int  # sha256 values held by two or more files
    exact_files: int  # files in those groups
    near_pairs: int  # pairs of different bytes within near_duplicate_bits
    joined: list[Tie]  # ties that put two patients' images (or a source split's) in one group
    # Pairs that still sit on two sides: near pairs above the threshold (within 1.5x, for a
    # person to look at), or copies between a source's own test and val splits, which are kept.
    across_splits: list[Tie]


def _patient_unit(patient_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the patient id."""
    digest = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _held_split(record: ImageRecord, has_test: bool, has_val: bool) -> str | None:
    """The source split a record keeps, or None when it is carved."""
    if record.split == "test" and has_test:
        return "test"
    if record.split == "val" and has_val:
        return "val"
    return None


def split_with_report(manifest: Manifest, config: SplitConfig | None = None) -> tuple[dict[str, str], DuplicateReport]:
    """Map every record's relpath to its final split, and report the content ties."""
    config = config or SplitConfig()
    records = sorted(manifest.records, key=lambda r: r.relpath)
    by_split = defaultdict(int)
    for record in records:
        by_split[record.split] += 1
    has_test = by_split["test"] > 0
    has_val = by_split["val"] >= config.min_val_images
    held = [_held_split(r, has_test, has_val) for r in records]

    groups = duplicates.Groups(len(records))
    first_of_patient: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        # Patient numbers tie images within one source split (or within the carved pool) only.
        key = (held[i] or "carved", record.patient_id)
        groups.join(first_of_patient.setdefault(key, i), i)
    same_bytes, near = _same_bytes(records), _near_pairs(records, config)
    ties = [(members[0], other, "same bytes", 0) for members in same_bytes for other in members[1:]]
    ties += [(i, j, kind, d) for i, j, kind, d in near if d <= config.near_duplicate_bits]
    joined = [(i, j, kind, d) for i, j, kind, d in ties if groups.join(i, j)]
    out = _assign(records, held, groups, has_test, has_val, config)

    def tie(i: int, j: int, kind: str, d: int) -> Tie:
        a, b = records[i].relpath, records[j].relpath
        return Tie(a=a, b=b, kind=kind, distance=d, splits=(out[a], out[b]))

    across = [(i, j, kind, d) for i, j, kind, d in ties if out[records[i].relpath] != out[records[j].relpath]]
    across += [(i, j, kind, d) for i, j, kind, d in near if d > config.near_duplicate_bits
               and out[records[i].relpath] != out[records[j].relpath]]
    report = DuplicateReport(
        near_duplicate_bits=config.near_duplicate_bits,
        exact_groups=len(same_bytes),
        exact_files=sum(len(m) for m in same_bytes),
        near_pairs=sum(1 for *_, d in near if d <= config.near_duplicate_bits),
        joined=[tie(*t) for t in joined],
        across_splits=sorted((tie(*t) for t in across), key=lambda t: (t.distance, t.a)),
    )
    return out, report


def _same_bytes(records: list[ImageRecord]) -> list[list[int]]:
    """The positions of the records of each sha256 held by two or more files."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_sha[record.sha256].append(i)
    return [members for members in by_sha.values() if len(members) > 1]


def _near_pairs(records: list[ImageRecord], config: SplitConfig) -> list[tuple[int, int, str, int]]:
    """Pairs (i, j, kind, bits), i < j, of different bytes whose fingerprints differ by at most 1.5x the tie
    threshold (the rest a person may review): as they are ("near copy"), one against the other's mirror
    image ("mirrored copy"), or against a held-out film's turned and cropped fingerprints ("turned or
    cropped copy"). One pair search over all of them; the closest reading of each pair is kept."""
    review_bits = config.near_duplicate_bits + config.near_duplicate_bits // 2
    n = len(records)
    owners = list(range(n)) * 2 + [i for i, r in enumerate(records) for _ in r.turned_fingerprints or ()]
    prints = [r.fingerprint for r in records] + [r.mirror_fingerprint for r in records]
    prints += [f for r in records for f in r.turned_fingerprints or ()]
    closest: dict[tuple[int, int], tuple[int, str]] = {}
    for a, b, d in duplicates.near_pairs(prints, review_bits):
        i, j = owners[a], owners[b]
        if a >= n or i == j or records[i].sha256 == records[j].sha256:
            continue  # only an image as it is against the others' prints; same bytes are tied already
        kind = "near copy" if b < n else "mirrored copy" if b < 2 * n else "turned or cropped copy"
        key = (min(i, j), max(i, j))
        closest[key] = min(closest.get(key, (d, kind)), (d, kind))
    return sorted((i, j, kind, d) for (i, j), (d, kind) in closest.items())


def _assign(
    records: list[ImageRecord], held: list[str | None], groups: duplicates.Groups, has_test: bool, has_val: bool,
    config: SplitConfig,
) -> dict[str, str]:
    """Each record's final split: its held source split, else its group's (held, or carved by patient hash)."""
    members_of: dict[int, list[int]] = defaultdict(list)
    for i in range(len(records)):
        members_of[groups.find(i)].append(i)
    out: dict[str, str] = {}
    for members in members_of.values():
        held_here = {held[i] for i in members} - {None}
        carved_to = next((split for split in HELD if split in held_here), None)
        if carved_to is None:
            unit = min(_patient_unit(records[i].patient_id, config.salt) for i in members if held[i] is None)
            if not has_test and unit < config.test_fraction:
                carved_to = "test"
            elif not has_val and unit >= 1.0 - config.val_fraction:
                carved_to = "val"
            else:
                carved_to = "train"
        for i in members:
            out[records[i].relpath] = held[i] or carved_to
    return out


def assign_splits(manifest: Manifest, config: SplitConfig | None = None) -> dict[str, str]:
    """Map every record's relpath to its final split.

    The source's test split is kept when it has images; otherwise test is carved from
    train. A source val split smaller than ``min_val_images`` is folded into train and
    val is carved. Carving moves whole groups of tied images (see the module docstring).
    """
    return split_with_report(manifest, config)[0]


def records_by_split(manifest: Manifest, config: SplitConfig | None = None) -> dict[str, list[ImageRecord]]:
    """Records of each final split, sorted by relpath (the order shards are filled in)."""
    assignment = assign_splits(manifest, config)
    out: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for record in sorted(manifest.records, key=lambda r: r.relpath):
        out[assignment[record.relpath]].append(record)
    return out
