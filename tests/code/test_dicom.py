"""DICOM films read as a viewer shows them, on real Part 10 files made from the shared films with pydicom."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from pneumo.config import recipe
from pneumo.images import ImageRejected, decode_cost
from pneumo.sizes import image_size
from pneumo.transform import featurize
from tests.dicom_helpers import dicom_dataset, dicom_from_jpeg, film_pixels, gray_jpeg, write_dicom

RECIPES = ("seed", "robust3")
# (stored bits, photometric interpretation, window, rescale): every case the reader decodes differently
CASES = {
    "8bit-mono2": dict(bits=8),
    "12bit-mono2": dict(bits=12),
    "16bit-mono2": dict(bits=16),
    "10bit-mono1": dict(bits=10, photometric="MONOCHROME1"),
    "12bit-mono1": dict(bits=12, photometric="MONOCHROME1"),
    "window": dict(bits=12, window=True),
    "window-rescale": dict(bits=12, window=True, rescale=True),
    "window-mono1": dict(bits=12, window=True, photometric="MONOCHROME1"),
    "voi-lut": dict(bits=12, voi_lut=True),
}
SYNTAXES = {"explicit-le": None, "rle": RLELossless, "jpeg2000-lossless": JPEG2000Lossless}


@pytest.fixture(scope="module")
def film(shared_data) -> np.ndarray:
    """One real film's 8-bit gray pixels."""
    return film_pixels(sorted((shared_data / "train" / "PNEUMONIA").iterdir())[3])


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("case", CASES)
def test_a_dicom_copy_gives_the_films_features(film, tmp_path, case, syntax):
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(film, **CASES[case]), syntax=SYNTAXES[syntax])
    for name in RECIPES:
        config = recipe(name).transform
        assert np.abs(featurize(str(path), config) - featurize(_png(film), config)).max() < 1e-3, name


def test_a_jpeg_baseline_dicom_gives_its_jpegs_features(film, tmp_path):
    jpeg = gray_jpeg(film)
    path = dicom_from_jpeg(tmp_path / "x.dcm", jpeg, film.shape)
    for name in RECIPES:
        config = recipe(name).transform
        assert np.abs(featurize(str(path), config) - featurize(jpeg, config)).max() < 1e-3, name


def test_the_window_is_applied(film, tmp_path):
    """Without its window the offset film would look different: the window is what makes it equal."""
    ds = dicom_dataset(film, bits=12, window=True)
    del ds.WindowCenter, ds.WindowWidth
    path = write_dicom(tmp_path / "x.dcm", ds)
    config = recipe("seed").transform
    assert np.abs(featurize(str(path), config) - featurize(_png(film), config)).max() > 0.05


def _refused(tmp_path, ds, max_pixels: int | None = None) -> str:
    path = write_dicom(tmp_path / "x.dcm", ds)
    config = recipe("seed").transform
    if max_pixels:
        config = config.model_copy(update={"max_pixels": max_pixels})
    with pytest.raises(ImageRejected) as caught:
        featurize(str(path), config)
    return str(caught.value)


def test_an_object_without_pixels_is_refused(film, tmp_path):
    ds = dicom_dataset(film)
    for name in ("PixelData", "Rows", "Columns"):
        delattr(ds, name)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert _refused(tmp_path, ds) == "DICOM object without pixel data (Basic Text SR Storage): not an image"


def test_a_multi_frame_object_is_refused(film, tmp_path):
    ds = dicom_dataset(np.concatenate([film, film]))
    ds.Rows, ds.NumberOfFrames = film.shape[0], 2
    assert _refused(tmp_path, ds).startswith("multi-frame DICOM (2 frames)")


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_a_colour_film_is_refused(film, tmp_path, photometric):
    ds = dicom_dataset(film)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.PixelData = np.repeat(film[..., None], 3, axis=2).tobytes()
    assert _refused(tmp_path, ds).startswith(f"colour DICOM ({photometric})")


def test_a_film_of_another_body_part_is_refused(film, tmp_path):
    ds = dicom_dataset(film, tags={"BodyPartExamined": "SKULL"})
    assert _refused(tmp_path, ds) == "not a chest film (BodyPartExamined SKULL)"


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
def test_a_lateral_film_is_refused(film, tmp_path, view):
    ds = dicom_dataset(film, tags={"ViewPosition": view})
    assert _refused(tmp_path, ds) == f"lateral view (ViewPosition {view}): frontal films only"


def test_a_film_over_the_pixel_bound_is_refused_before_its_pixels_are_decoded(film, tmp_path):
    ds = dicom_dataset(film)
    ds.PixelData = ds.PixelData[:100]  # a decode would fail: the header's size refuses it first
    assert _refused(tmp_path, ds, max_pixels=1000) == "too large: 224x224 pixels exceeds max_pixels=1000"


def test_a_file_over_the_byte_bound_is_refused_before_it_is_parsed(film, tmp_path):
    from pneumo.dicom import max_file_bytes

    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(film))
    with path.open("ab") as handle:  # trailing bytes: the file is parsed only once its size is known to be bounded
        handle.truncate(max_file_bytes(1000) + 1)
    config = recipe("seed").transform.model_copy(update={"max_pixels": 1000})
    with pytest.raises(ImageRejected, match=r"^too large: a DICOM file of \d+ bytes exceeds 16002000 bytes"):
        featurize(str(path), config)


def test_a_transfer_syntax_without_a_handler_is_named(film, tmp_path):
    from pydicom.encaps import encapsulate

    ds = dicom_dataset(film)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder for films
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    assert _refused(tmp_path, ds).startswith("no pixel decoder for transfer syntax MPEG2")


def test_sizes_come_from_the_header_alone(film, tmp_path):
    ds = dicom_dataset(film[:, :200])
    ds.PixelData = ds.PixelData[:64]  # no decode could give a picture: the size is the header's
    path = write_dicom(tmp_path / "x.dcm", ds)
    assert image_size(path) == (200, 224)
    assert decode_cost(path.read_bytes()) == 200 * 224 * 12


def test_a_kaggle_layout_of_dicom_films_enters_the_manifest(film, tmp_path):
    from pneumo.download import build_manifest

    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "train" / name).mkdir(parents=True)
        write_dicom(tmp_path / "train" / name / f"{name}-1.dcm", dicom_dataset(film))
    manifest = build_manifest(tmp_path)
    assert sorted(r.relpath for r in manifest.records) == ["train/NORMAL/NORMAL-1.dcm", "train/PNEUMONIA/PNEUMONIA-1.dcm"]
    assert all(r.fingerprint for r in manifest.records)
    assert not manifest.quarantine


def test_a_large_dicom_film_is_resampled_as_its_jpeg_is(film, tmp_path):
    """Above DICOM_REDUCE_ABOVE pixels a DICOM film is box-averaged to the JPEG's reduced-decode scale:
    the resample recipe then reads it as it reads the JPEG of the same pixels (which is what it trained on)."""
    from pneumo.images import DICOM_REDUCE_ABOVE

    side = int(DICOM_REDUCE_ABOVE**0.5) + 64
    big = np.asarray(Image.fromarray(film).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    grain = np.random.default_rng(0).normal(0.0, 3.0, big.shape)  # film grain, as benchmarks/synthesize.py adds
    big = np.clip(big + grain, 0, 255).round().astype(np.uint8)
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(big, bits=16))
    config = recipe("robust3").transform
    # z-scored features: decoded whole, this film is 0.07 off its JPEG's; box-averaged, 0.013
    assert np.abs(featurize(str(path), config) - featurize(gray_jpeg(big), config)).max() < 0.03


# --- pydicom's own bundled files: transfer syntaxes the helpers cannot write, and odd objects ---


def _bundled(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def _gray(path: str) -> np.ndarray:
    from pneumo.images import open_checked

    with open(path, "rb") as handle, open_checked(handle, 10**7) as image:
        return np.asarray(image)


@pytest.mark.parametrize("variant", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_every_lossless_transfer_syntax_gives_the_same_picture(variant):
    reference = _gray(_bundled("MR_small.dcm"))
    assert reference.std() > 10  # a picture, not a flat field
    assert np.array_equal(_gray(_bundled(variant)), reference)


@pytest.mark.parametrize(("name", "reason"), [
    ("reportsi.dcm", "DICOM object without pixel data (Basic Text SR Storage): not an image"),
    ("rtplan.dcm", "DICOM object without pixel data (RT Plan Storage): not an image"),
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM (2 frames): one film per file expected"),
    ("SC_rgb_rle.dcm", "colour DICOM (RGB): chest films are MONOCHROME1 or MONOCHROME2"),
    ("SC_ybr_full_422_uncompressed.dcm", "colour DICOM (YBR_FULL_422): chest films are MONOCHROME1 or MONOCHROME2"),
    ("examples_palette.dcm", "colour DICOM (PALETTE COLOR): chest films are MONOCHROME1 or MONOCHROME2"),
])
def test_pydicoms_odd_objects_are_refused_with_their_reason(name, reason):
    with pytest.raises(ImageRejected) as caught:
        _gray(_bundled(name))
    assert str(caught.value) == reason


def test_a_truncated_file_is_refused_not_crashed_on():
    with pytest.raises(ImageRejected, match=r"^(corrupt DICOM pixel data|unreadable DICOM header)"):
        _gray(_bundled("MR_truncated.dcm"))
