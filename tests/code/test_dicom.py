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
from tests.dicom_helpers import ODD_OBJECTS, dicom_dataset, dicom_from_jpeg, film_pixels, gray_jpeg, odd_object, write_dicom

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


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("case", CASES)
def test_the_copy_a_shard_keeps_of_a_dicom_film_is_its_picture_without_patient_data(film, tmp_path, case, syntax):
    """Val and test shards keep each film for the shift suite's views (features.kept_copy): of a DICOM film, its
    pixels and how to show them only (on main, the file itself, every planted identifier included)."""
    from pneumo.features import kept_copy
    from pneumo.images import decode_gray
    from tests.dicom_helpers import PLANTED

    data = write_dicom(tmp_path / "x.dcm", dicom_dataset(film, **CASES[case]), syntax=SYNTAXES[syntax]).read_bytes()
    kept = kept_copy(data)
    for value in [*PLANTED.values(), *PLANTED["PatientName"].split("^")]:
        assert value.encode() in data and value.encode() not in kept, value
    config = recipe("robust4").transform
    np.testing.assert_array_equal(decode_gray(kept, config), decode_gray(data, config))
    jpeg = gray_jpeg(film)
    assert kept_copy(jpeg) == jpeg  # other files are kept as they are


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
    assert _refused(tmp_path, ds) == f"lateral view (ViewPosition {view}): frontal films only (transform.accept_lateral keeps them)"


def test_a_lateral_film_is_read_when_asked_for(film, tmp_path):
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(film, tags={"ViewPosition": "LL"}))
    config = recipe("seed").transform.model_copy(update={"accept_lateral": True})
    assert np.abs(featurize(str(path), config) - featurize(_png(film), config)).max() < 1e-3


def _source(tmp_path, films: dict[str, object]) -> Path:
    """A Kaggle-layout source: each name's Dataset (or bytes) as train/NORMAL/{name}.dcm."""
    folder = tmp_path / "source" / "train" / "NORMAL"
    folder.mkdir(parents=True)
    for name, ds in films.items():
        if isinstance(ds, bytes):
            (folder / f"{name}.dcm").write_bytes(ds)
        else:
            write_dicom(folder / f"{name}.dcm", ds)
    return tmp_path / "source"


def test_the_manifest_quarantines_a_lateral_film_unless_asked_for(film, tmp_path):
    from pneumo.download import build_manifest
    from pneumo.manifest import QuarantineEntry

    root = _source(tmp_path, {"pa": dicom_dataset(film), "ll": dicom_dataset(film, tags={"ViewPosition": "LL"})})
    default = build_manifest(root)
    assert [r.relpath for r in default.records] == ["train/NORMAL/pa.dcm"]
    assert default.quarantine == [QuarantineEntry(
        relpath="train/NORMAL/ll.dcm", stage="manifest", out_of_scope=True,
        reason="lateral view (ViewPosition LL): frontal films only (transform.accept_lateral keeps them)")]
    asked = build_manifest(root, accept_lateral=True)
    assert {r.relpath: r.view for r in asked.records} == {"train/NORMAL/ll.dcm": "LL", "train/NORMAL/pa.dcm": "PA"}
    assert not asked.quarantine and all(r.fingerprint for r in asked.records)


def test_accept_lateral_is_a_run_setting():
    from pneumo.config import RunConfig

    assert RunConfig().transform.accept_lateral is False  # quarantined unless asked for
    assert RunConfig(transform={"accept_lateral": True}).transform.accept_lateral is True


def test_the_manifest_quarantines_what_is_no_frontal_chest_film_and_counts_none_of_it_as_bad(film, tmp_path):
    """The header's screen runs at the manifest: each odd object is quarantined there with its reason and
    out of scope, so a source of 10 films and 6 such objects passes the default max_bad_fraction (1 %);
    a broken file still counts."""
    from pneumo.config import RunConfig, SplitConfig
    from pneumo.download import build_manifest
    from pneumo.quarantine import build_report, check_bad_fraction

    good = {f"film{i}": dicom_dataset(np.roll(film, 9 * i, axis=1), patient_id=f"P{i}") for i in range(10)}
    root = _source(tmp_path, {**good, **{name: odd_object(film, name) for name in ODD_OBJECTS}})
    manifest = build_manifest(root)
    assert sorted(r.relpath for r in manifest.records) == sorted(f"train/NORMAL/{name}.dcm" for name in good)
    assert {q.relpath: (q.stage, q.reason, q.out_of_scope) for q in manifest.quarantine} == {
        f"train/NORMAL/{name}.dcm": ("manifest", reason, True) for name, reason in ODD_OBJECTS.items()}
    index = {"counts": {"train": {"NORMAL": 10, "PNEUMONIA": 0}}, "quarantine": [],
             "split_config": SplitConfig().model_dump(mode="json")}
    report = build_report(manifest, index)  # every input file accounted for, or it raises
    assert (report.n_inputs, report.n_quarantined, report.n_out_of_scope, report.bad_fraction) == (16, 6, 6, 0.0)
    check_bad_fraction(report, RunConfig().run.max_bad_fraction)
    broken = {**index, "counts": {"train": {"NORMAL": 9, "PNEUMONIA": 0}},
              "quarantine": [{"relpath": "train/NORMAL/film0.dcm", "stage": "transform", "reason": "corrupt DICOM pixel data"}]}
    assert build_report(manifest, broken).bad_fraction == pytest.approx(1 / 10)


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "MG", "XA"])
def test_a_film_of_another_modality_is_refused(film, tmp_path, modality):
    ds = dicom_dataset(film, tags={"Modality": modality})
    assert _refused(tmp_path, ds) == f"not a projection radiograph (Modality {modality}): CR, DR, DX, OT, RG films only"


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", "OT", None])
def test_a_projection_radiograph_is_read(film, tmp_path, modality):
    ds = dicom_dataset(film)
    if modality:
        ds.Modality = modality
    else:
        del ds.Modality
    path = write_dicom(tmp_path / "x.dcm", ds)
    config = recipe("seed").transform
    assert np.abs(featurize(str(path), config) - featurize(_png(film), config)).max() < 1e-3


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



def _large_film(film: np.ndarray, case: str):
    """A 1,100 x 1,030 film (over a megapixel, rows no multiple of the lookup's blocks) made from ``film``,
    with what the reader must get right: a window narrower than the data (clipped at both ends), a
    rescale and MONOCHROME1; or a signed 12-bit film with garbage in the 4 bits above BitsStored."""
    big = np.asarray(Image.fromarray(film).resize((1030, 1100), Image.Resampling.BICUBIC))
    if case == "window-rescale-mono1":
        ds = dicom_dataset(big, bits=12, window=True, rescale=True, photometric="MONOCHROME1")
        ds.WindowWidth = 2048  # half the data's range: both ends clip
        return ds
    ds = dicom_dataset(big, bits=12)
    values = np.frombuffer(ds.PixelData, "<u2").astype(np.int64) - 2048  # -2048 .. 2047: negative values too
    garbage = np.random.default_rng(0).integers(0, 16, values.shape) << 12
    ds.PixelRepresentation = 1
    ds.PixelData = ((values & 0x0FFF) | garbage).astype(np.uint16).tobytes()
    return ds


@pytest.mark.parametrize("case", ["window-rescale-mono1", "signed-garbage-bits"])
def test_a_large_films_shown_picture_is_the_display_steps_run_on_every_pixel(film, tmp_path, case):
    """gray8's shortcuts (stored bits read in place, one table indexed by the raw bits, the lookup in
    row blocks) give exactly the picture of the display steps run over pydicom's decoded array."""
    from pydicom.pixels import pixel_array

    from pneumo import dicom

    path = write_dicom(tmp_path / "x.dcm", _large_film(film, case))
    with open(path, "rb") as handle:
        ds = dicom.read(handle)
    stored = pixel_array(ds)  # pydicom's decode: the bits above BitsStored dropped, signed values extended
    reference = dicom.display(ds, stored)
    if case.startswith("signed"):
        assert stored.min() < 0 and (np.frombuffer(ds.PixelData, "<u2") >> 12).any()
    else:
        assert (reference == 0).any() and (reference == 255).any()  # the window clips at both ends
    np.testing.assert_array_equal(_gray(str(path)), reference)


# --- pydicom's own bundled files: transfer syntaxes the helpers cannot write, and odd objects ---


def _bundled(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def _gray(path: str) -> np.ndarray:
    """The file through the pipeline's door (the header's checks, then the pixels)."""
    from pneumo.images import open_checked

    with open(path, "rb") as handle, open_checked(handle, 10**7) as image:
        return np.asarray(image)


def _pixels(path: str) -> np.ndarray:
    """The pixels alone, as a viewer shows them: the bundled MR films are no chest films, their decoding is what is tested."""
    from pneumo import dicom

    with open(path, "rb") as handle:
        return dicom.gray8(dicom.read(handle))


@pytest.mark.parametrize("case", ["8bit-mono2", "12bit-mono2", "16bit-mono2", "12bit-mono1", "window-rescale"])
def test_the_shown_picture_of_a_dicom_copy_is_the_films_own_pixels(film, tmp_path, case):
    """Every stored value through the display table (one lookup, 8-bit and 16-bit containers alike):
    exactly the 8-bit film the copy was made from."""
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(film, **CASES[case]))
    np.testing.assert_array_equal(_pixels(str(path)), film)


@pytest.mark.parametrize("variant", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                     "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_every_lossless_transfer_syntax_gives_the_same_picture(variant):
    reference = _pixels(_bundled("MR_small.dcm"))
    assert reference.std() > 10  # a picture, not a flat field
    assert np.array_equal(_pixels(_bundled(variant)), reference)


@pytest.mark.parametrize(("name", "reason"), [
    ("reportsi.dcm", "DICOM object without pixel data (Basic Text SR Storage): not an image"),
    ("rtplan.dcm", "DICOM object without pixel data (RT Plan Storage): not an image"),
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM (2 frames): one film per file expected"),
    ("SC_rgb_rle.dcm", "colour DICOM (RGB): chest films are MONOCHROME1 or MONOCHROME2"),
    ("SC_ybr_full_422_uncompressed.dcm", "colour DICOM (YBR_FULL_422): chest films are MONOCHROME1 or MONOCHROME2"),
    ("examples_palette.dcm", "colour DICOM (PALETTE COLOR): chest films are MONOCHROME1 or MONOCHROME2"),
    ("CT_small.dcm", "not a projection radiograph (Modality CT): CR, DR, DX, OT, RG films only"),
    ("MR_small.dcm", "not a projection radiograph (Modality MR): CR, DR, DX, OT, RG films only"),
])
def test_pydicoms_odd_objects_are_refused_with_their_reason(name, reason):
    with pytest.raises(ImageRejected) as caught:
        _gray(_bundled(name))
    assert str(caught.value) == reason


def test_a_truncated_file_is_refused_not_crashed_on():
    from pneumo.dicom import DicomRejected

    with pytest.raises(DicomRejected, match=r"^(corrupt DICOM pixel data|unreadable DICOM header)"):
        _pixels(_bundled("MR_truncated.dcm"))


# --- The same prediction: a film and its DICOM copies through pneumo.predict's Predictor, with a trained model ---


@pytest.fixture(scope="module")
def predictor(small_source):
    """A TinyNet trained for real (10 epochs) on the default recipe's features of small_source's ~160 films,
    behind the registered-model path of pneumo.predict (the card's transform and test-time views)."""
    from pneumo import train
    from pneumo.predict import Predictor
    from pneumo.recipes import DEFAULT_RECIPE
    from tests.predict_helpers import card

    transform = recipe(DEFAULT_RECIPE).transform.model_copy(update={"size": (224, 224), "renditions": 0})
    films = [(path, label) for label, name in enumerate(("NORMAL", "PNEUMONIA"))
             for path in sorted((small_source / "train" / name).iterdir())]
    X = np.stack([featurize(str(path), transform) for path, _ in films])
    y = np.array([label for _, label in films], np.float32)
    val = np.arange(len(films)) % 5 == 0
    config = recipe(DEFAULT_RECIPE).train.model_copy(update={"epochs": 10, "patience": 10})
    result = train.train(X[~val], y[~val], X[val], y[val], config)
    return Predictor(result.state_dict, card(result.state_dict, 0.5, transform), model_name="tinynet", version="v0001")


def _same_prediction(predictor, film_bytes: bytes, copy: bytes) -> None:
    film, dicom = predictor.predict([("film.png", film_bytes), ("film.dcm", copy)])
    assert film.error is None and dicom.error is None, (film.error, dicom.error)
    assert abs(film.probability - dicom.probability) < 0.01, (film.probability, dicom.probability)


@pytest.mark.slow  # trains a model on real films: in `make test`, not `make test-fast`
@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("case", CASES)
def test_a_dicom_copy_gets_the_films_prediction(predictor, film, tmp_path, case, syntax):
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(film, **CASES[case]), syntax=SYNTAXES[syntax])
    _same_prediction(predictor, _png(film), path.read_bytes())


def test_a_jpeg_baseline_dicom_gets_its_jpegs_prediction(predictor, film, tmp_path):
    jpeg = gray_jpeg(film)
    _same_prediction(predictor, jpeg, dicom_from_jpeg(tmp_path / "x.dcm", jpeg, film.shape).read_bytes())
