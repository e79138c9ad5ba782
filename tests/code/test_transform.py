"""Stage 3, one image: the seed's recipe, its fast path, and the images it must refuse."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pneumo.config import TransformConfig, recipe, seed_transform
from pneumo.images import ImageRejected
from pneumo.transform import crop_box, featurize, max_pool
from tests.helpers import late_exif_png

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "chest_xray_224" / "train"
METHODS = ["fast", "exact"]


def _xray_like(width: int = 400, height: int = 300, seed: int = 0) -> np.ndarray:
    """A gray [0, 1] picture with structure in every grid cell: gradients, two 'lungs', noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    lungs = np.exp(-(((x - 0.32 * width) / (0.12 * width)) ** 2 + ((y - 0.5 * height) / (0.25 * height)) ** 2))
    lungs += np.exp(-(((x - 0.68 * width) / (0.12 * width)) ** 2 + ((y - 0.55 * height) / (0.22 * height)) ** 2))
    picture = 0.15 + 0.5 * (x / width) * (y / height) + 0.4 * lungs + rng.normal(0, 0.02, (height, width))
    return np.clip(picture, 0, 1)


def _gray8(picture: np.ndarray) -> Image.Image:
    return Image.fromarray((picture * 255).round().astype(np.uint8))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# Every mode the transform accepts, made from the same picture, and the format that stores it.
MODES = {
    "L": (lambda g: g, "png"),
    "RGB": (lambda g: g.convert("RGB"), "png"),
    "RGBA": (lambda g: g.convert("RGBA"), "png"),
    "LA": (lambda g: g.convert("LA"), "png"),
    "P": (lambda g: g.convert("P"), "png"),  # 256 gray levels fit the palette exactly
    "I;16": (lambda g: Image.fromarray((np.asarray(g, np.uint16) * 257)), "png"),
    # CMYK and 32-bit "I" images come only in TIFF among Pillow's writers, and TIFF is refused
    # (pneumo.images); CMYK is read as JPEG below, 16-bit gray as PNG above.
    "1": (lambda g: g.convert("1"), "png"),
    "bmp": (lambda g: g.convert("RGB"), "bmp"),
    "jpeg-L": (lambda g: g, "jpeg"),
    "jpeg-RGB": (lambda g: g.convert("RGB"), "jpeg"),
    "jpeg-CMYK": (lambda g: g.convert("CMYK"), "jpeg"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODES)
def test_every_mode_gives_gray_features_in_unit_range(tmp_path, name, method):
    make, extension = MODES[name]
    gray = _gray8(_xray_like())
    path = tmp_path / f"image.{extension}"
    make(gray).save(path, **({"quality": 95} if extension == "jpeg" else {}))
    config = seed_transform(method=method)

    features = featurize(path, config)

    assert features.shape == (140,) and features.dtype == np.float32
    assert 0.0 <= features.min() and features.max() <= 1.0
    if name != "1":  # a 1-bit image keeps only the dithering of the picture
        reference = featurize(_save(tmp_path / "reference.png", gray), config)
        # Same gray levels whatever the storage: 16-bit divided by 65535, alpha dropped, ...
        tolerance = 0.04 if extension == "jpeg" else 0.005  # JPEG is lossy; max-pooling keeps its ringing
        np.testing.assert_allclose(features, reference, atol=tolerance)


def _save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def _rotated_for(upright: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels that EXIF ``orientation`` turns back into ``upright``."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    return upright.transpose(undo[orientation])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_image_gives_the_upright_features(tmp_path, orientation, method):
    upright = _gray8(_xray_like(900, 700))  # large enough for the fast path to decode at reduced scale
    exif = Image.Exif()
    exif[0x0112] = orientation
    config = seed_transform(method=method)

    straight = featurize(_save(tmp_path / "upright.jpeg", upright, quality=95), config)
    rotated = featurize(_save(tmp_path / "rotated.jpeg", _rotated_for(upright, orientation), quality=95, exif=exif.tobytes()), config)

    np.testing.assert_allclose(rotated, straight, atol=0.03)  # JPEG blocks fall elsewhere once rotated
    # Without applying the rotation the features would be far apart: the picture is asymmetric.
    assert np.abs(featurize(_save(tmp_path / "ignored.jpeg", _rotated_for(upright, orientation)), config) - straight).max() > 0.05


@pytest.mark.parametrize("recipe_name", ["seed", "robust3"])
@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_png_whose_exif_follows_the_pixels_gives_the_upright_features(orientation, shape, recipe_name):
    """Issue 23, item 10: the seed's fast path took the size from the header, before load()
    read an eXIf chunk placed after IDAT, so turns 5-8 raised IndexError or misread the film."""
    width, height = (320, 220) if shape == "wide" else (220, 320)
    upright = _gray8(_xray_like(width, height, seed=orientation))
    data = late_exif_png(upright, orientation)
    assert "exif" not in Image.open(io.BytesIO(data)).info  # the header parse does not see it
    for config in ([seed_transform(method=m) for m in METHODS] if recipe_name == "seed" else [recipe(recipe_name).transform]):
        straight = featurize(_png(upright), config)
        np.testing.assert_array_equal(featurize(data, config), straight)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_max_pool_puts_a_bright_pixel_in_its_cell():
    cropped = np.zeros((800, 1040), np.float32)  # 1000 x 1300 after a 10 % crop
    cropped[85, 80] = 1.0  # row cells are 80 high, column cells 74 or 75 wide
    pooled = max_pool(cropped, (10, 14))
    assert pooled.shape == (10, 14)
    assert np.argwhere(pooled == 1.0).tolist() == [[1, 1]]
    assert pooled.sum() == 1.0


def test_max_pool_cells_differ_by_one_pixel_at_most():
    column_index = np.tile(np.arange(1040), (800, 1))
    last_column_of_each_cell = max_pool(column_index, (10, 14))[0]
    widths = np.diff(np.r_[-1, last_column_of_each_cell])
    assert widths.sum() == 1040 and set(widths.tolist()) == {74, 75}


def test_crop_box_matches_the_seed():
    left, top, right, bottom = crop_box(1000, 1300, 0.1)
    assert (bottom - top, right - left) == (800, 1040)


@pytest.mark.parametrize("method", METHODS)
def test_bright_spot_lands_in_the_right_feature(tmp_path, method):
    picture = np.zeros((1000, 1300), np.uint8)  # already at the target size
    # Cell (row 3, col 5): rows 100 + 240..320, cols 130 + 371..446 after the crop.
    picture[100 + 260 : 100 + 300, 130 + 390 : 130 + 430] = 255
    features = featurize(_save(tmp_path / "spot.png", Image.fromarray(picture)), seed_transform(method=method))
    assert int(features.argmax()) == 3 * 14 + 5
    assert features[3 * 14 + 5] > 0.9 and np.delete(features, 3 * 14 + 5).max() < 0.1


def _realistic_jpegs(tmp_path: Path) -> list[Path]:
    """Full-size JPEGs like the Kaggle originals: upscaled real X-rays if present, else synthetic."""
    rng = np.random.default_rng(1)
    sources = sorted(SHARED.glob("*/*.jpeg"))[::1500][:3]
    pictures = [np.asarray(Image.open(p).convert("L").resize((1800, 1400), Image.Resampling.BICUBIC), np.float32) / 255 for p in sources]
    if not pictures:
        pictures = [_xray_like(1800, 1400, seed) for seed in range(3)]
    paths = []
    for i, picture in enumerate(pictures):
        noisy = np.clip(picture + rng.normal(0, 1.5 / 255, picture.shape), 0, 1)
        paths.append(_save(tmp_path / f"full{i}.jpeg", _gray8(noisy), quality=90))
    return paths


def test_fast_agrees_with_exact_on_realistic_images(tmp_path):
    for path in _realistic_jpegs(tmp_path):
        exact = featurize(path, seed_transform(method="exact"))
        fast = featurize(path, seed_transform(method="fast"))
        assert _pearson(exact, fast) >= 0.99, path.name
        assert np.abs(exact - fast).mean() < 0.05


def test_fast_keeps_thin_bright_details_that_exact_sees(tmp_path):
    # A 3-pixel bright marker stroke, like the letters on real films, in an otherwise dim cell.
    picture = _xray_like(1800, 1400) * 0.5
    picture[300:420, 1500:1503] = 1.0
    path = _save(tmp_path / "marker.jpeg", _gray8(picture), quality=90)
    exact = featurize(path, seed_transform(method="exact"))
    fast = featurize(path, seed_transform(method="fast"))
    cell = int(exact.argmax())
    assert exact[cell] > 0.9
    # Decoded at 1/8 scale, 8 x 8 block means dilute the stroke to ~0.46 and r to ~0.87.
    assert fast[cell] > 0.7
    assert _pearson(exact, fast) >= 0.98


@pytest.mark.parametrize("size", [(30, 20), (80, 60)])  # fewer than 4 pixels per cell, and more
def test_small_images_agree_with_exact(tmp_path, size):
    path = _save(tmp_path / "small.png", _gray8(_xray_like(*size)))
    exact = featurize(path, seed_transform(method="exact"))
    fast = featurize(path, seed_transform(method="fast"))
    assert _pearson(exact, fast) >= 0.95
    np.testing.assert_allclose(fast, exact, atol=0.06)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 15_000, 30_000])  # above PIL's warning, above its error, far above
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageRejected, match="too large"):
        featurize(path)


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = _save(tmp_path / "big.png", _gray8(_xray_like(400, 300)))
    with pytest.raises(ImageRejected, match=r"too large: 400x300 pixels exceeds max_pixels=100000"):
        featurize(path, seed_transform(max_pixels=100_000))


@pytest.mark.parametrize("method", METHODS)
def test_bad_files_are_rejected_with_a_specific_reason(tmp_path, method):
    config = seed_transform(method=method)
    jpeg = _save(tmp_path / "good.jpeg", _gray8(_xray_like(600, 500)), quality=90).read_bytes()
    cases = {
        "empty.jpeg": (b"", "empty file (0 bytes)"),
        "notes.jpeg": (b"not an image at all\n" * 20, "not an image (cannot identify image file)"),
        "half.jpeg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "header-cut.jpeg": (jpeg[:40], "truncated header"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageRejected) as caught:
            featurize(tmp_path / name, config)
        assert str(caught.value) == reason, name
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on behind the caller's back


def test_missing_file_is_not_a_bad_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        featurize(tmp_path / "nowhere.jpeg")


def test_grid_larger_than_the_cropped_image_is_a_config_error(tmp_path):
    path = _save(tmp_path / "small.png", _gray8(_xray_like(40, 30)))
    with pytest.raises(ValueError, match="fewer than the 10x14 grid"):
        featurize(path, seed_transform(size=(10, 14)))


def test_a_jpeg_cut_short_near_its_end_is_still_rejected(tmp_path):
    # The fast path stops decoding below the crop; the missing tail must still be noticed.
    jpeg = _save(tmp_path / "good.jpeg", _gray8(_xray_like(1200, 900)), quality=90).read_bytes()
    for method in METHODS:
        assert featurize(tmp_path / "good.jpeg", seed_transform(method=method)).shape == (140,)
        (tmp_path / "tail.jpeg").write_bytes(jpeg[: len(jpeg) * 97 // 100])
        with pytest.raises(ImageRejected, match="truncated JPEG"):
            featurize(tmp_path / "tail.jpeg", seed_transform(method=method))


def test_a_flat_film_takes_the_exact_recipe(tmp_path):
    # Low contrast plus grain: a gray level of error would pull r under 0.99, so fast defers to exact.
    rng = np.random.default_rng(1)
    picture = 0.5 + 0.02 * _xray_like(1800, 1400) + rng.normal(0, 2 / 255, (1400, 1800))
    path = _save(tmp_path / "flat.jpeg", _gray8(np.clip(picture, 0, 1)), quality=90)
    exact = featurize(path, seed_transform(method="exact"))
    fast = featurize(path, seed_transform(method="fast"))
    assert exact.std() < 10 / 255
    np.testing.assert_allclose(fast, exact, atol=1e-5)


def test_a_shortened_frame_header_decodes_the_same_top_rows(tmp_path):
    from pneumo.images import open_top_rows

    picture = _gray8(_xray_like(1300, 1000))
    path = _save(tmp_path / "baseline.jpeg", picture, quality=90)
    with Image.open(path) as image:
        whole = np.asarray(image)
    with open(path, "rb") as handle:
        cut = open_top_rows(handle, 900)
        assert cut is not None
        with cut as image:
            assert image.size == (1300, 900)
            np.testing.assert_array_equal(np.asarray(image), whole[:900])
    # Progressive files keep their full header: their scans cover the whole frame.
    picture.save(tmp_path / "progressive.jpeg", quality=90, progressive=True)
    with open(tmp_path / "progressive.jpeg", "rb") as handle:
        assert open_top_rows(handle, 900) is None


def test_the_resampler_says_how_much_padding_it_trimmed():
    """A barred film's features are the film's own under trim_padding: the trimmed shares are what shows the bars."""
    from pneumo.transform import Resampler, borders, pool_features

    trimmed = recipe("robust3").transform.model_copy(update={"renditions": 0})
    film = _xray_like(224, 224).astype(np.float32)
    letterbox = np.pad(film, ((20, 20), (0, 0)))  # 40 of 264 rows: black bars above and below
    pillarbox = np.pad(film, ((0, 0), (0, 16)))  # 16 of 240 columns, one side
    plain, boxed, pillared = (Resampler(g, trimmed) for g in (film, letterbox, pillarbox))
    np.testing.assert_array_equal(plain.borders, [0, 0])
    np.testing.assert_allclose(boxed.borders, [40 / 264, 0])
    np.testing.assert_allclose(pillared.borders, [0, 16 / 240])
    assert boxed.borders.dtype == np.float32
    np.testing.assert_array_equal(pool_features(boxed.canvas(), trimmed), pool_features(plain.canvas(), trimmed))
    for gray, picture in ((letterbox, boxed), (pillarbox, pillared)):
        np.testing.assert_array_equal(borders(gray, trimmed), picture.borders)  # the same figure without a resampler
    # A recipe that trims nothing reports nothing (its features show the bars instead).
    untrimmed = recipe("robust2").transform.model_copy(update={"renditions": 0})
    np.testing.assert_array_equal(Resampler(letterbox, untrimmed).borders, [0, 0])
    np.testing.assert_array_equal(borders(letterbox, untrimmed), [0, 0])


@pytest.mark.parametrize("cell_pixels, lead", [(8, ()), (8, (5,)), (8, (2, 3)), (16, (4,))])
def test_pool_features_are_numpys_two_axis_reductions_bit_for_bit(cell_pixels, lead):
    """pool_features reduces a cell's rows and columns in two steps (and adds the mean's sums by whole-array
    adds): the same float32 numbers as one numpy reduction over both axes, which every card was built with."""
    from pneumo.transform import pool_features

    config = recipe("robust4").transform.model_copy(update={"cell_pixels": cell_pixels})
    rows, cols = config.grid
    k = cell_pixels
    rng = np.random.default_rng(0)
    canvas = rng.random((*lead, rows * k, cols * k), dtype=np.float32) ** 3  # values of every magnitude
    canvas[..., :k, :k] = 0.1  # a flat cell
    cells = canvas.reshape(*lead, rows, k, cols, k)
    axes = (len(lead) + 1, len(lead) + 3)
    for pooling in [("max", "mean"), ("mean",), ("max",)]:
        for normalize in ("zscore", "none"):
            chosen = config.model_copy(update={"pooling": pooling, "normalize": normalize})
            parts = np.stack([(cells.max(axis=axes) if mode == "max" else cells.mean(axis=axes)).reshape(*lead, rows * cols)
                              for mode in pooling], axis=-2)
            if normalize == "zscore":
                parts = (parts - parts.mean(axis=-1, keepdims=True)) / np.maximum(parts.std(axis=-1, keepdims=True), 1e-6)
            want = parts.reshape(*lead, -1).astype(np.float32, copy=False)
            got = pool_features(canvas, chosen)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want), (pooling, normalize)
