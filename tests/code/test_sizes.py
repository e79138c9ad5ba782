"""Stage 2: size percentiles from image headers only."""

from __future__ import annotations

import io
import hashlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pneumo.manifest import ImageRecord, Manifest
from pneumo.sizes import image_size, size_percentiles, target_size
from tests.helpers import late_exif_png

# (width, height) of the images of each class
NORMAL_SIZES = [(300, 200), (320, 240), (400, 300), (260, 250)]
PNEUMONIA_SIZES = [(500, 410), (350, 280), (610, 480)]


def _jpeg_bytes(width: int, height: int, **save) -> bytes:
    gradient = np.linspace(0, 255, width * height).reshape(height, width).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _record(root, relpath: str, data: bytes, label: int) -> ImageRecord:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ImageRecord(
        relpath=relpath, split="train", label=label, patient_id=relpath, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )


@pytest.fixture
def manifest(tmp_path) -> Manifest:
    records = [_record(tmp_path, f"train/NORMAL/n{i}.jpeg", _jpeg_bytes(w, h), 0) for i, (w, h) in enumerate(NORMAL_SIZES)]
    records += [_record(tmp_path, f"train/PNEUMONIA/p{i}.jpeg", _jpeg_bytes(w, h), 1) for i, (w, h) in enumerate(PNEUMONIA_SIZES)]
    return Manifest(root=str(tmp_path), records=records)


def test_percentiles_overall_and_per_class(manifest):
    calls = []
    stats = size_percentiles(manifest, progress=lambda done, total: calls.append((done, total)))

    assert stats.n == len(NORMAL_SIZES) + len(PNEUMONIA_SIZES)
    assert stats.percentiles == [25, 50, 75, 90, 99]
    everything = NORMAL_SIZES + PNEUMONIA_SIZES
    for p in stats.percentiles:
        key = f"p{p:g}"
        assert stats.overall["width"][key] == pytest.approx(np.percentile([w for w, _ in everything], p))
        assert stats.overall["height"][key] == pytest.approx(np.percentile([h for _, h in everything], p))
        assert stats.per_class["NORMAL"]["width"][key] == pytest.approx(np.percentile([w for w, _ in NORMAL_SIZES], p))
        assert stats.per_class["PNEUMONIA"]["height"][key] == pytest.approx(np.percentile([h for _, h in PNEUMONIA_SIZES], p))
    assert calls[-1] == (stats.n, stats.n) and len(calls) == stats.n


def test_target_size_is_height_width_at_the_percentile(manifest):
    stats = size_percentiles(manifest, percentiles=(50, 75))
    everything = NORMAL_SIZES + PNEUMONIA_SIZES
    expected = (round(np.percentile([h for _, h in everything], 75)), round(np.percentile([w for w, _ in everything], 75)))
    assert target_size(stats, 75) == expected
    with pytest.raises(ValueError, match="percentile 90 was not computed; available: 50, 75"):
        target_size(stats, 90)


def test_unreadable_files_are_listed_not_fatal(manifest, tmp_path):
    jpeg = _jpeg_bytes(300, 200)
    bad = [
        _record(tmp_path, "train/NORMAL/empty.jpeg", b"", 0),
        _record(tmp_path, "train/NORMAL/text.jpeg", b"this is not an image\n" * 10, 0),
        _record(tmp_path, "train/PNEUMONIA/cut.jpeg", jpeg[:40], 1),  # stops inside the header
    ]
    manifest = manifest.model_copy(update={"records": manifest.records + bad})

    stats = size_percentiles(manifest)

    assert stats.n == len(NORMAL_SIZES) + len(PNEUMONIA_SIZES)
    refused = {q.relpath: q for q in stats.unreadable}
    assert set(refused) == {r.relpath for r in bad}
    assert all(q.stage == "sizes" for q in stats.unreadable)
    assert refused["train/NORMAL/text.jpeg"].reason == "cannot identify image file"
    assert refused["train/NORMAL/empty.jpeg"].reason == "cannot identify image file"
    assert refused["train/PNEUMONIA/cut.jpeg"].reason == "truncated header"


def test_sizes_never_decode_pixels(manifest, tmp_path, monkeypatch):
    # A JPEG cut just after its header: decoding it fails, reading its size does not.
    data = _jpeg_bytes(640, 480)
    broken = _record(tmp_path, "train/NORMAL/no-scan.jpeg", data[: data.index(b"\xff\xda") + 20], 0)
    with Image.open(tmp_path / broken.relpath) as image, pytest.raises(OSError, match="truncated"):
        image.load()
    manifest = manifest.model_copy(update={"records": manifest.records + [broken]})

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)

    stats = size_percentiles(manifest)
    assert stats.n == len(manifest.records) and not stats.unreadable
    assert image_size(tmp_path / broken.relpath) == (640, 480)


@pytest.mark.parametrize("orientation, expected", [(1, (300, 200)), (3, (300, 200)), (6, (200, 300)), (8, (200, 300))])
def test_exif_rotation_swaps_width_and_height(tmp_path, orientation, expected):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpeg"
    path.write_bytes(_jpeg_bytes(300, 200, exif=exif.tobytes()))
    assert image_size(path) == expected


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_png_s_exif_after_the_pixels_turns_its_size_too(tmp_path, orientation):
    """Issue 23, item 10: the size stage (and predict's size warnings) read the header only, where an
    eXIf chunk placed after IDAT is not; the chunk headers are walked for it, still without decoding."""
    path = tmp_path / "turned.png"
    path.write_bytes(late_exif_png(Image.new("L", (200, 300), 128), orientation))
    assert image_size(path) == (200, 300)
