"""The same film under another name, or re-saved, never lands on the other side of a split.

Real films of the shared train split, plus 100 copies: 60 renamed byte-for-byte the way
people copy files (``Copy of IM-0119-0001.jpeg``, ``export_person12_virus_44.jpeg``,
``IM-0119-0001_dup.jpeg``), 40 re-encoded, resized or converted to PNG under new names.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pneumo.download import build_manifest
from pneumo.splits import assign_splits
from tests.helpers import copy_patient_subset

# One xdist worker runs the whole module, so that its module fixture (with_copies) is built once.
pytestmark = pytest.mark.xdist_group("test_duplicate_splits")


def make_copies(root: Path) -> list[tuple[str, str, str]]:
    """100 copies of films under ``root``: (original relpath, copy relpath, how made)."""
    originals = sorted(root.glob("train/*/*.jpeg"))[::5][:100]
    assert len(originals) == 100
    made = []
    for i, path in enumerate(originals):
        folder, stem = path.parent, path.stem
        if i < 20:
            how, copy = "renamed", folder / f"Copy of {path.name}"
        elif i < 40:
            how, copy = "renamed", folder / f"export_{path.name}"
        elif i < 60:
            how, copy = "renamed", folder / f"{stem}_dup.jpeg"
        else:
            how, copy = ("re-encoded q60", "resized 512x512", "resized 160x200", "PNG")[i % 4], None
        if copy is not None:
            shutil.copy2(path, copy)
        else:
            image = Image.open(path)
            copy = folder / (f"scan_{i:03d}.png" if how == "PNG" else f"scan_{i:03d}.jpeg")
            if how.startswith("resized"):
                image = image.resize((512, 512) if "512" in how else (160, 200))
            image.save(copy, **({} if how == "PNG" else {"quality": 60 if "q60" in how else 90}))
        made.append((path.relative_to(root).as_posix(), copy.relative_to(root).as_posix(), how))
    return made


@pytest.fixture(scope="module")
def with_copies(shared_data, tmp_path_factory):
    root = copy_patient_subset(shared_data, tmp_path_factory.mktemp("copies"), per_class=400)
    copies = make_copies(root)
    return build_manifest(root), copies


@pytest.mark.slow  # hashes the shared films: in `make test`, not `make test-fast`
def test_copies_never_cross_splits(with_copies):
    manifest, copies = with_copies
    assignment = assign_splits(manifest)
    # The originals span all three carved splits, so a copy could have crossed.
    assert {assignment[original] for original, _, _ in copies} == {"train", "val", "test"}
    crossed = [(copy, how, assignment[original], assignment[copy]) for original, copy, how in copies
               if assignment[original] != assignment[copy]]
    assert crossed == []


def test_the_data_report_names_what_was_joined(with_copies):
    from pneumo.splits import split_with_report

    manifest, copies = with_copies
    _, report = split_with_report(manifest)
    ties_of: dict[str, list] = {}
    for tie in report.joined:
        ties_of.setdefault(tie.a, []).append(tie)
        ties_of.setdefault(tie.b, []).append(tie)
    # "_dup" copies parse to their original's patient: tied already, nothing to join.
    needed = [(original, copy, how) for original, copy, how in copies if not copy.endswith("_dup.jpeg")]
    assert len(needed) == 80
    for original, copy, how in needed:
        kind = "same bytes" if how == "renamed" else "near copy"
        assert any(tie.kind == kind and tie.distance <= report.near_duplicate_bits for tie in ties_of.get(copy, [])), copy
    assert report.exact_groups >= 60 and report.near_pairs >= 40


def test_the_quarantine_report_carries_the_ties(with_copies):
    from pneumo.config import SplitConfig
    from pneumo.quarantine import build_report

    manifest, copies = with_copies
    index = {"quarantine": [], "counts": {"train": {"NORMAL": len(manifest.records)}},
             "split_config": SplitConfig().model_dump(mode="json")}
    report = build_report(manifest, index)
    tied = {name for tie in report.duplicates.joined for name in (tie.a, tie.b)}
    assert {copy for _, copy, _ in copies if not copy.endswith("_dup.jpeg")} <= tied
    assert report.duplicates.across_splits == [] or all(t.kind == "near copy" and t.distance > 112
                                                        for t in report.duplicates.across_splits)


# --- Issue 23, item 5: mirrored, turned and cropped copies of held-out films ---------------------

COPY_KINDS = {
    "mirror": ("mirrored copy", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    "rotated 3 degrees": ("turned or cropped copy", lambda im: im.rotate(3, Image.Resampling.BILINEAR)),
    "rotated -3 degrees": ("turned or cropped copy", lambda im: im.rotate(-3, Image.Resampling.BILINEAR)),
    "2% cropped": ("turned or cropped copy", lambda im: im.crop(
        (im.width // 50, im.height // 50, im.width - im.width // 50, im.height - im.height // 50))),
}


@pytest.fixture(scope="module")
def held_out_copies(shared_data, tmp_path_factory):
    """A source with train/ and test/ (real films, split by patient), and in train/ 5 copies of each
    COPY_KINDS kind of distinct test films, under names of their own (each its own patient)."""
    root = tmp_path_factory.mktemp("held")
    films = sorted((shared_data / "train").glob("*/*.jpeg"))[::12][:400]
    made = []
    for path in films:
        split = "test" if int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 4 == 0 else "train"
        (root / split / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / split / path.parent.name / path.name)
    tests = sorted(root.glob("test/*/*.jpeg"))
    assert len(tests) >= 5 * len(COPY_KINDS)
    for k, path in enumerate(tests[: 5 * len(COPY_KINDS)]):
        how = list(COPY_KINDS)[k % len(COPY_KINDS)]
        copy = root / "train" / path.parent.name / f"scan_{k:03d}.jpeg"
        COPY_KINDS[how][1](Image.open(path)).save(copy, quality=90)
        made.append((path.relative_to(root).as_posix(), copy.relative_to(root).as_posix(), how))
    return build_manifest(root), made


@pytest.mark.slow  # hashes the shared films: in `make test`, not `make test-fast`
def test_mirrored_turned_and_cropped_copies_of_test_films_leave_train_and_are_listed(held_out_copies):
    from pneumo.splits import split_with_report

    manifest, made = held_out_copies
    assignment, report = split_with_report(manifest)
    kind_of = {frozenset((t.a, t.b)): t for t in report.joined}
    for original, copy, how in made:
        assert assignment[original] == "test" and assignment[copy] == "test", (copy, how)
        tie = kind_of.get(frozenset((original, copy)))
        assert tie is not None and tie.kind == COPY_KINDS[how][0], (copy, how)
        assert tie.distance <= report.near_duplicate_bits
    # No other films were tied: the turned and mirrored prints found the copies and nothing else.
    assert {frozenset((t.a, t.b)) for t in report.joined if t.kind != "same bytes"} == {frozenset(m[:2]) for m in made}
