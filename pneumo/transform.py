"""Stage 3, one image: the seed's recipe that turns an X-ray into rows * cols numbers.

Recipe (Joffreybvn/challenge-pneumonia): merge the channels into one gray layer (their
mean), scale to [0, 1], resize to ``config.size``, cut ``config.crop_fraction`` off every
border, max-pool to ``config.grid`` cells, flatten row by row.

Two methods give the same features up to resampling detail:

- ``exact`` follows the recipe literally at full resolution. It is the reference.
- ``fast`` lets libjpeg decode JPEGs at 1/2 to 1/8 scale (``Image.draft``), then max-pools
  the cropped region of the decoded pixels directly. Decoding dominates the cost: a
  reduced-scale decode skips most of the inverse DCT, and what remains is entropy decoding,
  which no decoder can skip. Pooling the decoded pixels, not a resampled copy, keeps thin
  bright details (markers, letters) that a resampling filter would blur: per-image Pearson
  r >= 0.99 against ``exact`` on realistic full-size X-rays (benchmarks/transform.py).
  For JPEGs it takes libjpeg's luma (0.299 R + 0.587 G + 0.114 B) instead of the channel
  mean; the two are equal for gray X-rays.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo.config import TransformConfig
from pneumo.sizes import oriented_size

# fast: decode JPEGs at the smallest DCT scale that keeps this many pixels per pool cell.
# 8 (mostly 1/8 scale) measured per-image r down to 0.96 against exact: block means lose
# small bright details; 24 (mostly 1/2 scale) kept r >= 0.99 and costs ~20% more decode time.
DECODE_PIXELS_PER_CELL = 24
# Images with fewer pixels than this per cell are upsampled first, as the exact recipe does.
MIN_PIXELS_PER_CELL = 4

_JPEG_FORMATS = {"JPEG", "MPO"}


class ImageRejected(ValueError):
    """The file cannot be used as an image; the message is the reason, for the quarantine."""


def featurize(path: str | Path, config: TransformConfig | None = None) -> np.ndarray:
    """The image's features: float32 array of rows * cols values in [0, 1].

    Raises ImageRejected for files that are not images, are corrupt or truncated, or have
    more than ``config.max_pixels`` pixels. A missing file raises FileNotFoundError.
    """
    config = config or TransformConfig()
    _check_geometry(config)
    with open(path, "rb") as handle:
        if not handle.read(1):
            raise ImageRejected("empty file (0 bytes)")
        handle.seek(0)
        image = _open(handle, config)
        with image:
            try:
                if config.method == "exact":
                    return _featurize_exact(image, config)
                return _featurize_fast(image, config)
            except ImageRejected:
                raise
            except Image.DecompressionBombError as error:
                raise ImageRejected(f"too large ({error})") from None
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                raise ImageRejected(_decode_failure(image, error)) from None


def max_pool(gray: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Max of each cell of a rows x cols grid over a 2-D array.

    Cell edges are rounded from evenly spaced points, so sizes that the grid does not
    divide (1040 / 14) give cells that differ by one pixel at most.
    """
    rows, cols = grid
    height, width = gray.shape
    if height < rows or width < cols:
        raise ValueError(f"array {height}x{width} is smaller than the {rows}x{cols} grid")
    row_edges = np.round(np.linspace(0, height, rows + 1)).astype(int)[:-1]
    col_edges = np.round(np.linspace(0, width, cols + 1)).astype(int)[:-1]
    pooled = np.maximum.reduceat(gray, row_edges, axis=0)
    return np.maximum.reduceat(pooled, col_edges, axis=1)


def crop_box(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels kept after cutting ``crop_fraction`` off every border."""
    top = round(crop_fraction * height)
    left = round(crop_fraction * width)
    return left, top, width - left, height - top


def _check_geometry(config: TransformConfig) -> None:
    height, width = config.size
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    rows, cols = config.grid
    if bottom - top < rows or right - left < cols:
        raise ValueError(
            f"size {config.size} cropped by {config.crop_fraction} leaves {bottom - top}x{right - left} pixels, "
            f"fewer than the {rows}x{cols} grid; use a bigger size or a smaller grid"
        )


def _open(handle, config: TransformConfig) -> Image.Image:
    """Open from the header only, refusing oversized images before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL's own bomb guard: its warning (above Image.MAX_IMAGE_PIXELS, ~89 MP by
            # default) counts as a refusal too, so the limit is the lower of the two.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except UnidentifiedImageError:
        raise ImageRejected("not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, EOFError) or "truncated" in str(error).lower():
            raise ImageRejected("truncated header") from None
        raise ImageRejected(f"unreadable header ({type(error).__name__}: {error})") from None
    width, height = image.size
    if width * height > config.max_pixels:
        image.close()
        raise ImageRejected(f"too large: {width}x{height} pixels exceeds max_pixels={config.max_pixels}")
    if width < 1 or height < 1:
        image.close()
        raise ImageRejected(f"empty image: {width}x{height} pixels")
    return image


def _decode_failure(image: Image.Image, error: Exception) -> str:
    kind = image.format or "image"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return f"truncated {kind}"
    return f"corrupt {kind} ({type(error).__name__}: {error})"


def _gray(image: Image.Image) -> np.ndarray:
    """One float32 gray layer in [0, 1]: the mean of the colour channels, alpha dropped."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit scans; PIL opens 16-bit PNGs as I;16 or I. Larger values cannot be 16-bit.
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        raise ImageRejected("unsupported mode F (floating-point pixels have no known range)")
    if mode in ("L", "LA", "La", "1"):
        layer = image.getchannel(0) if mode != "1" else image.convert("L")
        return np.asarray(layer, dtype=np.float32) / 255.0
    if mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        # P, PA, CMYK, YCbCr, LAB, HSV...: PIL knows how to turn each into RGB (or RGBA).
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    return rgb.mean(axis=2) / 255.0


def _featurize_exact(image: Image.Image, config: TransformConfig) -> np.ndarray:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    gray = Image.fromarray(_gray(image))  # float32 -> mode F
    height, width = config.size
    # The seed resized with skimage (bilinear, anti-aliased); PIL's bilinear also widens
    # its filter when shrinking, so it anti-aliases the same way.
    resized = np.asarray(gray.resize((width, height), Image.Resampling.BILINEAR))
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    return max_pool(resized[top:bottom, left:right], config.grid).ravel().astype(np.float32)


def _featurize_fast(image: Image.Image, config: TransformConfig) -> np.ndarray:
    height, width = config.size
    rows, cols = config.grid
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    # The crop as fractions of the image: resizing first does not move them.
    fractions = (left / width, top / height, right / width, bottom / height)

    if image.format in _JPEG_FORMATS:
        shown_w, shown_h = oriented_size(image)
        # Smallest decode that leaves DECODE_PIXELS_PER_CELL pixels per cell inside the crop.
        need_w = math.ceil(cols * DECODE_PIXELS_PER_CELL / (fractions[2] - fractions[0]))
        need_h = math.ceil(rows * DECODE_PIXELS_PER_CELL / (fractions[3] - fractions[1]))
        need_w, need_h = min(need_w, shown_w), min(need_h, shown_h)
        if (shown_w, shown_h) != image.size:  # stored rotated: ask in stored axes
            need_w, need_h = need_h, need_w
        image.draft("L", (need_w, need_h))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # after draft: rotating the small decode is cheap

    # 8-bit gray (every JPEG here) is pooled as bytes: max commutes with scaling to [0, 1].
    pixels = np.asarray(image) if image.mode == "L" else _gray(image)
    h, w = pixels.shape
    box = (fractions[0] * w, fractions[1] * h, fractions[2] * w, fractions[3] * h)
    if min((box[3] - box[1]) / rows, (box[2] - box[0]) / cols) < MIN_PIXELS_PER_CELL:
        k = MIN_PIXELS_PER_CELL
        gray = Image.fromarray(pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels)
        region = np.asarray(gray.resize((cols * k, rows * k), Image.Resampling.BILINEAR, box=box))
        return region.reshape(rows, k, cols, k).max(axis=(1, 3)).ravel().astype(np.float32)
    left, top, right, bottom = (round(edge) for edge in box)
    pooled = max_pool(pixels[top:bottom, left:right], config.grid).ravel().astype(np.float32)
    return pooled / 255.0 if pixels.dtype == np.uint8 else pooled
