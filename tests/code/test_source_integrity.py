"""The right pixels: where images are read from, bytes that change, odd names, hidden files, formats.

Issue 12, items 1-5. Each test here failed on the code before the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from pneumo import sizes
from pneumo.config import SplitConfig, TransformConfig, seed_transform
from pneumo.download import build_manifest, source_fingerprint
from pneumo.images import FormatNotAllowed, ImageRejected, open_image, sniff_format
from pneumo.manifest import ManifestRef, load_manifest, save_manifest
from pneumo.quarantine import build_report
from pneumo.shard_files import index_uri, read_index, write_index
from pneumo.shards import plan_shards, write_shard
from pneumo.transform import featurize

TRANSFORM = seed_transform(size=(100, 130))
SPLIT = SplitConfig(min_val_images=0)


def gray(seed: int, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))


def write_dataset(root: Path, n: int = 6) -> Path:
    """n NORMAL and n PNEUMONIA JPEGs in the Kaggle layout, one patient each."""
    for i in range(n):
        for label, name in (("NORMAL", f"IM-{i:04d}-0001.jpeg"), ("PNEUMONIA", f"person{i}_virus_{i}.jpeg")):
            path = root / "train" / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            gray(i * 2 + (label == "PNEUMONIA")).save(path, quality=90)
    return root


def shard_and_report(manifest, out_dir: Path):
    """Write every shard and the index, then reconcile them with the manifest."""
    results = [write_shard(spec) for spec in plan_shards(manifest, SPLIT, TRANSFORM, 100, str(out_dir))]
    uri = index_uri(str(out_dir), manifest.digest(), TRANSFORM, SPLIT, 100)
    write_index(results, uri, manifest_digest=manifest.digest(), transform=TRANSFORM, split_config=SPLIT)
    return build_report(manifest, read_index(uri))


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


# --------------------------------------------------------------------------- 1. where the pixels come from


def test_the_manifest_file_never_says_where_the_images_are(tmp_path):
    a = write_dataset(tmp_path / "A")
    b = write_dataset(tmp_path / "B")
    manifest_a, manifest_b = build_manifest(a), build_manifest(b)
    assert manifest_a.digest() == manifest_b.digest()  # one dataset version, one shared file

    uri = save_manifest(manifest_a, str(tmp_path / "manifests"))
    assert save_manifest(manifest_b, str(tmp_path / "manifests")) == uri
    assert "root" not in json.loads(Path(uri).read_text())
    assert str(tmp_path) not in Path(uri).read_text()

    # Each run's reference keeps its own folder, and the specs read from it.
    ref_a = ManifestRef.from_manifest(manifest_a, uri)
    assert ref_a.root == str(a.resolve())
    specs = plan_shards(load_manifest(uri, ref_a.root), SPLIT, TRANSFORM, 5, str(tmp_path / "shards"))
    assert {spec.root for spec in specs} == {str(a.resolve())}
    # Without a root, planning refuses rather than guessing a folder.
    with pytest.raises(ValueError, match="does not say where its images are"):
        plan_shards(load_manifest(uri), SPLIT, TRANSFORM, 5, str(tmp_path / "shards"))


def test_a_root_left_in_an_older_manifest_file_is_ignored(tmp_path):
    a = write_dataset(tmp_path / "A")
    uri = save_manifest(build_manifest(a), str(tmp_path / "manifests"))
    data = json.loads(Path(uri).read_text())
    Path(uri).write_text(json.dumps({**data, "root": str(tmp_path / "B")}))  # as the old code wrote it

    assert load_manifest(uri, str(a)).root == str(a)
    assert load_manifest(uri).root is None


# --------------------------------------------------------------------------- 2. bytes that change under the run


@pytest.mark.parametrize("method", ["fast", "exact"])
@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_featurize_takes_a_path_bytes_or_a_file_object(tmp_path, method, kind):
    path = tmp_path / f"image.{kind.lower()}"
    gray(1, (300, 240)).save(path, kind)
    config = seed_transform(size=(200, 260), method=method)
    expected = featurize(path, config)
    np.testing.assert_array_equal(featurize(str(path), config), expected)
    np.testing.assert_array_equal(featurize(path.read_bytes(), config), expected)
    with open(path, "rb") as handle:
        handle.read(10)  # read from the start, whatever the position
        np.testing.assert_array_equal(featurize(handle, config), expected)
        assert not handle.closed  # the caller's file stays the caller's
    np.testing.assert_array_equal(featurize(io.BytesIO(path.read_bytes()), config), expected)


def test_an_image_rewritten_after_the_manifest_is_quarantined_not_featurized(tmp_path):
    root = write_dataset(tmp_path / "data")
    manifest = build_manifest(root)
    victim = root / "train" / "NORMAL" / "IM-0002-0001.jpeg"
    before = victim.read_bytes()
    gray(99).save(victim, quality=90)  # other pixels, after the manifest hashed the file
    after = hashlib.sha256(victim.read_bytes()).hexdigest()
    grown = root / "train" / "PNEUMONIA" / "person3_virus_3.jpeg"
    grown.write_bytes(grown.read_bytes() + b"\0" * (3 << 20))  # a valid JPEG still, 3 MiB longer

    results = [write_shard(spec) for spec in plan_shards(manifest, SPLIT, TRANSFORM, 100, str(tmp_path / "shards"))]
    refused = {q.relpath: q.reason for r in results for q in r.quarantine}
    assert sorted(refused) == ["train/NORMAL/IM-0002-0001.jpeg", "train/PNEUMONIA/person3_virus_3.jpeg"]
    reason = refused["train/NORMAL/IM-0002-0001.jpeg"]
    assert reason.startswith("changed during the run (sha256 ")
    assert after[:16] in reason and hashlib.sha256(before).hexdigest()[:16] in reason
    assert refused["train/PNEUMONIA/person3_virus_3.jpeg"].startswith("changed during the run (longer than the manifest's")
    assert sum(r.count for r in results) == len(manifest.records) - 2


def test_verify_source_sees_a_same_size_rewrite_with_the_mtime_set_back(tmp_path):
    root = write_dataset(tmp_path / "data")
    victim = root / "train" / "NORMAL" / "IM-0001-0001.bmp"
    gray(5).save(victim)  # BMP: same dimensions, same number of bytes
    cheap, full = source_fingerprint(str(root)), source_fingerprint(str(root), verify=True)
    assert cheap != full

    info = victim.stat()
    gray(6).save(victim)
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert victim.stat().st_size == info.st_size

    assert source_fingerprint(str(root)) == cheap  # what the cheap fingerprint cannot see
    assert source_fingerprint(str(root), verify=True) != full


# --------------------------------------------------------------------------- 3. file names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_quarantined_with_its_name_shown_safely(tmp_path):
    root = write_dataset(tmp_path / "data")
    folder = os.fsencode(root / "train" / "NORMAL")
    try:
        with open(os.path.join(folder, b"IM-8010-0001-caf\xe9.jpeg"), "wb") as handle:
            gray(7).save(handle, "JPEG")
    except OSError as error:  # some file systems refuse such names outright
        pytest.skip(f"this file system refuses non-UTF-8 names: {error}")

    manifest = build_manifest(root)
    reasons = {q.relpath: q.reason for q in manifest.quarantine}
    assert reasons == {"train/NORMAL/IM-8010-0001-caf\\xe9.jpeg": "file name is not valid UTF-8"}
    assert len(manifest.records) == 12  # the rest are kept

    # The manifest and the quarantine report serialize (they failed with a UnicodeEncodeError).
    uri = save_manifest(manifest, str(tmp_path / "manifests"))
    assert load_manifest(uri, str(root)).digest() == manifest.digest()
    report = shard_and_report(manifest, tmp_path / "shards")
    text = report.model_dump_json()
    assert "caf\\\\xe9" in text and report.n_inputs == 13 == report.n_in_shards + report.n_quarantined


# --------------------------------------------------------------------------- 4. hidden files and OS junk


def test_hidden_images_are_quarantined_and_os_junk_is_counted_as_skipped(tmp_path):
    root = write_dataset(tmp_path / "data")
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    gray(8).save(pneumonia / ".person9999_bacteria_1.jpeg")  # hidden, but a valid image
    (normal / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (pneumonia / "._person0_virus_0.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (root / "train" / "Thumbs.db").write_bytes(b"thumbs")
    (normal / "__MACOSX").mkdir()
    (normal / "__MACOSX" / "._IM-0000-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")

    manifest = build_manifest(root)
    assert {q.relpath: q.reason for q in manifest.quarantine} == {
        "train/PNEUMONIA/.person9999_bacteria_1.jpeg": "hidden file (name starts with '.'): rename it to use it",
    }
    assert {(e.relpath, e.reason) for e in manifest.skipped} == {
        ("train/NORMAL/.DS_Store", "OS metadata: macOS folder settings (.DS_Store)"),
        ("train/PNEUMONIA/._person0_virus_0.jpeg", "OS metadata: macOS AppleDouble file (._*)"),
        ("train/Thumbs.db", "OS metadata: Windows folder settings (Thumbs.db)"),
        ("train/NORMAL/__MACOSX/._IM-0000-0001.jpeg", "OS metadata: macOS archive folder (__MACOSX)"),
    }
    # Skipped files are part of the dataset version, and of the saved manifest.
    uri = save_manifest(manifest, str(tmp_path / "manifests"))
    assert len(load_manifest(uri).skipped) == 4
    clean = build_manifest(write_dataset(tmp_path / "clean"))
    assert clean.digest() != manifest.digest()

    # Every file of the split folders is accounted for: in a shard, quarantined or skipped.
    report = shard_and_report(manifest, tmp_path / "shards")
    assert report.n_inputs == len(all_files(root)) == 17
    assert (report.n_in_shards, report.n_quarantined, report.n_skipped) == (12, 1, 4)
    assert report.skipped_by_reason["OS metadata: macOS AppleDouble file (._*)"] == 1
    assert report.bad_fraction == pytest.approx(1 / 13)  # junk is not bad data


# --------------------------------------------------------------------------- 5. the format allow-list

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 64
%%EndComments
newpath 0 0 moveto 64 64 lineto stroke
showpage
%%EOF
"""


def encoded(kind: str) -> bytes:
    if kind == "EPS":
        return EPS
    buffer = io.BytesIO()
    gray(3, (64, 64)).save(buffer, kind)
    return buffer.getvalue()


REFUSED = ["TIFF", "GIF", "WEBP", "JPEG2000", "ICO", "EPS"]


@pytest.mark.parametrize("kind", REFUSED)
def test_formats_outside_the_allow_list_are_refused_by_name(tmp_path, kind, monkeypatch):
    ghostscript = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ghostscript.append(args) or 1 / 0)
    path = tmp_path / "IM-0001-0001.jpeg"  # named like a JPEG, as in the issue
    path.write_bytes(encoded(kind))
    shown = "JPEG 2000" if kind == "JPEG2000" else kind

    for method in ("fast", "exact"):
        with pytest.raises(ImageRejected, match=rf"^format {shown} not allowed \(allowed: JPEG, PNG, BMP\)$"):
            featurize(path, seed_transform(size=(100, 130), method=method))
    with pytest.raises(FormatNotAllowed, match=f"format {shown} not allowed"):
        sizes.image_size(path)
    assert ghostscript == []  # no file is ever handed to an external interpreter


def test_size_percentiles_leave_out_refused_formats_with_the_reason(tmp_path):
    root = write_dataset(tmp_path / "data")
    (root / "train" / "NORMAL" / "IM-0100-0001.jpeg").write_bytes(encoded("TIFF"))
    stats = sizes.size_percentiles(build_manifest(root))
    assert stats.n == 12
    assert [(e.relpath, e.reason) for e in stats.unreadable] == [
        ("train/NORMAL/IM-0100-0001.jpeg", "format TIFF not allowed (allowed: JPEG, PNG, BMP)")
    ]


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "BMP", "MPO"])
def test_allowed_formats_are_featurized(tmp_path, kind):
    path = tmp_path / "IM-0001-0001.jpeg"
    image = gray(4, (200, 160)).convert("RGB")
    if kind == "MPO":  # JPEG's multi-picture variant (phones, stereo cameras): its first picture is read
        image.save(path, "MPO", save_all=True, append_images=[gray(5, (200, 160)).convert("RGB")])
    else:
        image.save(path, kind)
    with open_image(path) as opened:
        assert opened.format == kind
    assert featurize(path, TRANSFORM).shape == (140,)
    assert sizes.image_size(path) == (200, 160)


def test_sniff_names_formats_from_their_first_bytes():
    for kind, name in [("TIFF", "TIFF"), ("GIF", "GIF"), ("WEBP", "WEBP"), ("JPEG2000", "JPEG 2000"), ("ICO", "ICO"),
                       ("EPS", "EPS"), ("JPEG", "JPEG"), ("PNG", "PNG"), ("BMP", "BMP")]:
        assert sniff_format(encoded(kind)[:132]) == name, kind
    assert sniff_format(b"\x00" * 128 + b"DICM" + b"\x00" * 8) == "DICOM"
    assert sniff_format(b"<html>not a picture</html>") is None
