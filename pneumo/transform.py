"""Stage 3, one image: the seed's recipe that turns an X-ray into rows * cols numbers.

Recipe (Joffreybvn/challenge-pneumonia): merge the channels into one gray layer (their
mean), scale to [0, 1], resize to ``config.size``, cut ``config.crop_fraction`` off every
border, max-pool to ``config.grid`` cells, flatten row by row.

Two methods give the same features up to resampling detail:

- ``exact`` follows the recipe literally at full resolution. It is the reference.
- ``fast`` lets libjpeg decode JPEGs at 1/2 to 1/8 scale (``Image.draft``) and estimates
  exact's cell maxima from the decoded pixels. Decoding dominates the cost, and most of it
  is entropy decoding, which no decoder can skip; a reduced-scale decode skips most of the
  inverse DCT, and a frame header shortened to end just below the crop (``images.open_top_rows``)
  skips the bottom margin's rows altogether. Each cell covers the same part of the picture
  as in exact; its maximum is taken over the decoded samples inside it and the values
  interpolated on its borders (``_cell_maxima``). Pooling decoded samples, not a resampled
  copy, keeps thin bright details (markers, letters) that a resampling filter would blur.
  Films whose features barely vary (std under FLAT_SPREAD) follow exact's recipe instead
  (``_featurize_flat``): there a gray level of error is enough to pull r under 0.99.
  Measured on the 5,840 realistic full-size X-rays of benchmarks/transform.py: per-image
  Pearson r against ``exact`` min 0.992, median 0.999; 24 images (0.4 %) take exact's
  recipe; on one process it takes 1.12x to 1.17x the time of the bare 1/8-scale decode.
  For JPEGs it takes libjpeg's luma (0.299 R + 0.587 G + 0.114 B) instead of the channel
  mean; the two are equal for gray X-rays.

A third method, ``resample`` (the robust recipe's), decodes at a reduced scale
(``images.decode_reduced``), resamples the crop to a canvas of ``cell_pixels`` per cell
side (``Resampler``) and pools it with max and/or mean, each part z-scored per image if
asked (``pool_features``). ``config.size`` does not matter to it: the cells cover the same
parts of the film at any size. With ``trim_padding`` the flat bars at the picture's borders
(``padding``) are cut first. The same decoded picture serves its augmented renditions
(pneumo.augment) and the shift suite (pneumo.shift).

Opening and decoding files (the format allow-list, the refusals and their reasons, the
orientation, gray conversion, reduced JPEG decodes) is pneumo.images's job.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pneumo.config import TransformConfig, recipe
from pneumo.images import (
    JPEG_FORMATS,
    binary_source,
    decode_errors,
    decode_reduced,
    header_orientation,
    open_checked,
    open_top_rows,
    oriented_size,
    to_gray,
)

# fast: decode JPEGs at the smallest DCT scale that keeps this many pixels per pool cell.
# Measured on 5,840 X-rays, per-image r against exact with the FLAT_SPREAD fallback: 12 or
# 14 (more 1/4 and 1/8 decodes) leave a film at 0.9898; 16 (1/4 or 1/2 scale) min 0.9922;
# 20 min 0.9936 but ~1% slower. At 1/8 scale, block means dilute thin 3-pixel strokes.
DECODE_PIXELS_PER_CELL = 16
# fast: features that spread less than this (std over the cells) are recomputed exactly.
# The fast estimate is off by ~1.2 gray levels per cell (p90 1.5: grain peaks that a
# reduced decode cannot place), and r >= 0.99 needs that error under 0.14 x the spread:
# 1.5 / 0.14 ~ 10.5 levels. 0.4 % of the benchmark's films fall under it.
FLAT_SPREAD = 10.5 / 255
# Images with fewer pixels than this per cell are upsampled first, as the exact recipe does.
MIN_PIXELS_PER_CELL = 4
# resample with trim_padding: a border row (or column) is padding when its values lie within
# PADDING_FLATNESS of each other and of the border's first row: no row of a film is that flat.
# At most PADDING_MOST of a side is cut; a picture that is flat all over is left as it is.
PADDING_FLATNESS = 8 / 255
PADDING_MOST = 0.3


def featurize(source: str | Path | bytes | BinaryIO, config: TransformConfig | None = None) -> np.ndarray:
    """The image's features: float32 array of rows * cols values in [0, 1].

    ``source`` is a path, the file's bytes, or a binary file object (read from its start;
    the caller closes it). Raises ``images.ImageRejected`` for files that are not images, are in a
    format outside ``images.ALLOWED_FORMATS``, are corrupt or truncated, or have more than
    ``config.max_pixels`` pixels. A missing file raises FileNotFoundError.
    """
    config = config or recipe("seed").transform
    _check_geometry(config)
    with binary_source(source) as handle:
        with open_checked(handle, config.max_pixels, accept_lateral=config.accept_lateral) as image:
            with decode_errors(image):
                if config.method == "exact":
                    return _featurize_exact(image, config)
                if config.method == "resample":
                    return pool_features(render(decode_reduced(image, config), config), config)
                return _featurize_fast(image, config, handle)


def max_pool(gray: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Max of each cell of a rows x cols grid over a 2-D array.

    Cell edges are rounded from evenly spaced points, so sizes that the grid does not
    divide (1040 / 14) give cells that differ by one pixel at most.
    """
    rows, cols = grid
    height, width = gray.shape
    if height < rows or width < cols:
        raise ValueError(f"array {height}x{width} is smaller than the {rows}x{cols} grid")
    row_edges = np.round(np.linspace(0, height, rows + 1)).astype(int).tolist()
    col_edges = np.round(np.linspace(0, width, cols + 1)).astype(int)[:-1]
    # Rows as one slice max per cell row: numpy's reduceat is ~8x slower along axis 0.
    pooled = np.stack([gray[a:b].max(axis=0) for a, b in zip(row_edges[:-1], row_edges[1:])])
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


def _featurize_exact(image: Image.Image, config: TransformConfig) -> np.ndarray:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    gray = Image.fromarray(to_gray(image))  # float32 -> mode F
    height, width = config.size
    # The seed resized with skimage (bilinear, anti-aliased); PIL's bilinear also widens
    # its filter when shrinking, so it anti-aliases the same way.
    resized = np.asarray(gray.resize((width, height), Image.Resampling.BILINEAR))
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    return max_pool(resized[top:bottom, left:right], config.grid).ravel().astype(np.float32)


def _featurize_fast(image: Image.Image, config: TransformConfig, handle) -> np.ndarray:
    height, width = config.size
    rows, cols = config.grid
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    # The crop as fractions of the image: resizing first does not move them.
    fractions = (left / width, top / height, right / width, bottom / height)
    shown_w, shown_h = oriented_size(image)
    scale = 1  # source pixels per decoded pixel
    cut = None

    if image.format in JPEG_FORMATS:
        # Smallest decode that leaves DECODE_PIXELS_PER_CELL pixels per cell inside the crop;
        # libjpeg offers 1/2, 1/4 and 1/8, and Image.draft picks the same one.
        need_w = math.ceil(cols * DECODE_PIXELS_PER_CELL / (fractions[2] - fractions[0]))
        need_h = math.ceil(rows * DECODE_PIXELS_PER_CELL / (fractions[3] - fractions[1]))
        scale = max((s for s in (8, 4, 2, 1) if shown_w // s >= need_w and shown_h // s >= need_h), default=1)
        if image.format == "JPEG" and header_orientation(image) == 1:
            # The crop drops the bottom rows: a frame header that ends the image just below
            # them makes libjpeg stop there and skip ~10% of the decoding (the rows are
            # decoded top to bottom, so the top margin cannot be skipped).
            # (2 rows of margin: _cell_maxima interpolates one sample past the last row.)
            keep = min(shown_h, math.ceil(fractions[3] * shown_h) + 2 * scale)
            cut = open_top_rows(handle, keep) if keep < shown_h else None
            if cut is not None:
                image = cut
        stored_w, stored_h = image.size
        image.draft("L", (stored_w // scale, stored_h // scale))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # after draft: rotating the small decode is cheap
    if scale == 1 and cut is None:
        # The size as decoded and turned: a PNG's eXIf chunk may follow the pixel data, where
        # only load() reads it, so the header's size can be the other way round (issue 23).
        shown_w, shown_h = image.size
    # 8-bit gray (every JPEG here) is pooled as bytes: max commutes with scaling to [0, 1].
    pixels = np.asarray(image) if image.mode == "L" else to_gray(image)
    if cut is not None:
        cut.close()  # the shortened copy; featurize closes the image it opened

    w, h = shown_w / scale, shown_h / scale  # the decoded picture, even if its bottom was cut
    box = (fractions[0] * w, fractions[1] * h, fractions[2] * w, fractions[3] * h)
    if min((box[3] - box[1]) / rows, (box[2] - box[0]) / cols) < MIN_PIXELS_PER_CELL:
        k = MIN_PIXELS_PER_CELL
        gray = Image.fromarray(pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels)
        region = np.asarray(gray.resize((cols * k, rows * k), Image.Resampling.BILINEAR, box=box))
        return region.reshape(rows, k, cols, k).max(axis=(1, 3)).ravel().astype(np.float32)

    features = _cell_maxima(pixels, (shown_w, shown_h), scale, config).ravel()
    if pixels.dtype == np.uint8:
        features /= 255.0
    deviations = features - features.mean()
    if deviations @ deviations < FLAT_SPREAD**2 * features.size:  # their std, ~5x faster than .std()
        # Too flat to trust: r against exact is about spread / sqrt(spread^2 + error^2), and
        # the error here (~1.2 gray levels, grain peaks that a reduced decode cannot place)
        # would take r under 0.99. Such films are rare; follow exact's recipe instead.
        return _featurize_flat(handle, config)
    return features


def _featurize_flat(handle, config: TransformConfig) -> np.ndarray:
    """exact's recipe, for films too flat for the reduced decode, at a fraction of its cost.

    JPEGs decode to libjpeg's luma, as in the fast path, rather than three channels; the
    resize covers only the crop, which gives exact's resized pixels up to float rounding.
    """
    handle.seek(0)
    with open_checked(handle, config.max_pixels, accept_lateral=config.accept_lateral) as image:
        if image.format in JPEG_FORMATS:
            image.draft("L", image.size)  # full scale, one channel
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        gray = Image.fromarray(to_gray(image))  # float32 -> mode F
    height, width = config.size
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    w, h = gray.size
    box = (left * w / width, top * h / height, right * w / width, bottom * h / height)
    region = np.asarray(gray.resize((right - left, bottom - top), Image.Resampling.BILINEAR, box=box))
    return max_pool(region, config.grid).ravel().astype(np.float32)


def _cell_maxima(pixels: np.ndarray, source_size: tuple[int, int], scale: int, config: TransformConfig) -> np.ndarray:
    """The rows x cols cell maxima of exact's resized image, estimated from ``pixels``.

    ``pixels`` is the image (``source_size`` = width, height as displayed) decoded at 1/``scale``;
    rows below the crop may be missing. Each cell covers the same part of the picture as in
    exact. Its maximum is the max of the decoded samples inside it and of the values
    interpolated at its borders: where brightness ramps up across a cell, exact's maximum
    lies on the border, which the coarse sample grid misses by up to half a sample.
    """
    height, width = config.size
    left, top, right, bottom = crop_box(height, width, config.crop_fraction)
    rows, cols = config.grid
    col_first, col_last = _cell_spans(left, right, cols, source_size[0] / width / scale, pixels.shape[1])
    low, high = int(col_first[0]), min(int(col_last[-1]) + 2, pixels.shape[1])  # the columns used
    pixels = pixels[:, low:high]
    first, last = _cell_spans(top, bottom, rows, source_size[1] / height / scale, pixels.shape[0])
    # Rows first, one slice max per cell row: numpy's reduceat is ~8x slower along axis 0.
    spans = zip(np.ceil(first).astype(int).tolist(), (np.floor(last).astype(int) + 1).tolist())
    inner = [pixels[i:j].max(axis=0) for i, j in spans]
    band = np.maximum(np.stack(inner), _border_values(pixels, first, last))  # rows x used columns
    # Then columns of that small array: samples ceil(first) .. floor(last) of each cell.
    first, last = col_first - low, col_last - low
    starts = np.empty(2 * cols - 1, dtype=np.intp)
    starts[0::2] = np.ceil(first)
    starts[1::2] = np.floor(last[:-1]) + 1
    inner = np.maximum.reduceat(band[:, : int(last[-1]) + 1], starts, axis=1)[:, 0::2]
    return np.maximum(inner, _border_values(band.T, first, last).T)


def _cell_spans(start: int, stop: int, parts: int, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions, in samples along an axis of ``n``, of each cell's first and last resized pixel.

    Cells split resized pixels start..stop as in max_pool; ``step`` is samples per resized
    pixel, and resized pixel i sits at sample position (i + 0.5) * step - 0.5.
    """
    edges = _cell_edges(start, stop, parts)
    first = np.minimum(np.maximum((edges[:-1] + 0.5) * step - 0.5, 0), n - 1)  # (np.clip is slower)
    last = np.minimum(np.maximum((edges[1:] - 0.5) * step - 0.5, 0), n - 1)
    return first, last


@functools.lru_cache(maxsize=64)
def _cell_edges(start: int, stop: int, parts: int) -> np.ndarray:
    return start + np.round(np.linspace(0, stop - start, parts + 1))


def _border_values(a: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Along axis 0, the larger of the values interpolated at positions first[k] and last[k]."""
    at = np.concatenate([first, last])
    below = np.minimum(at.astype(np.intp), len(a) - 2)
    weight = (at - below).astype(np.float32)[:, None]
    lo = a[below].astype(np.float32)
    values = lo + weight * (a[below + 1] - lo)
    return np.maximum(values[: len(first)], values[len(first) :])


# --- The "resample" method: decode small, resample the crop to a canvas, pool it ------------
#
# One decode per image (images.decode_gray) serves the original, its augmented renditions
# (pneumo.augment) and the acquisition shifts (pneumo.shift): each is a resampling of the decoded picture onto a
# canvas of cell_pixels x cell_pixels per cell, which costs a fraction of the decode.


def render(gray: np.ndarray, config: TransformConfig, warp: tuple[float, ...] | None = None) -> np.ndarray:
    """The crop of ``gray`` resampled to a (rows * cell_pixels, cols * cell_pixels) float32 canvas.

    ``warp`` = (zoom_x, zoom_y, translate_x, translate_y, rotation_degrees) moves the picture before the
    crop; see Resampler, which renders one picture many ways for the cost of one set-up.
    """
    return Resampler(gray, config).canvas(warp)


def padding(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): how many rows and columns of flat padding border ``gray``.

    A scanner that fits a film to another aspect ratio, or a viewer's export, adds flat bars.
    Inside the training period such bars go with the label (a quarter of NORMAL films of the
    shared data have a flat band at a side, 6 % of PNEUMONIA films), so a model that sees
    them reads them; the bars are cut before anything else looks at the picture. Bands are
    looked for again after a cut: bars on two sides overlap in the corners.
    """
    height, width = gray.shape
    if float(gray.max() - gray.min()) <= PADDING_FLATNESS:
        return 0, 0, 0, 0
    most = (int(PADDING_MOST * height),) * 2 + (int(PADDING_MOST * width),) * 2
    cut = [0, 0, 0, 0]
    while True:
        inside = gray[cut[0] : height - cut[1], cut[2] : width - cut[3]]
        sides = (inside, inside[::-1], inside.T, inside.T[::-1])  # top, bottom, left, right: border line first
        more = [_flat_band(lines, most[side] - cut[side]) for side, lines in enumerate(sides)]
        if not any(more):
            return tuple(cut)
        cut = [c + m for c, m in zip(cut, more)]


def _flat_band(lines: np.ndarray, most: int) -> int:
    """How many of the first lines (rows of ``lines``, at most ``most``) are flat and alike."""
    lines = lines[:most]
    if not len(lines):
        return 0
    low, high = lines.min(axis=1), lines.max(axis=1)
    centre = (low + high) / 2
    alike = (high - low <= PADDING_FLATNESS) & (np.abs(centre - centre[0]) <= PADDING_FLATNESS)
    return len(lines) if alike.all() else int(np.argmin(alike))


def trim_padding(gray: np.ndarray) -> np.ndarray:
    """``gray`` without the flat bands at its borders (``padding``)."""
    return _trimmed(gray, padding(gray))


def _trimmed(gray: np.ndarray, cut: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = cut
    height, width = gray.shape
    return gray[top : height - bottom, left : width - right]


def trimmed_share(gray: np.ndarray, cut: tuple[int, int, int, int]) -> np.ndarray:
    """float32 (rows, columns): the share of ``gray``'s rows and of its columns that ``cut`` (``padding``'s) removes.

    The features of a trimmed film are the film's own, so this is what shows a scanner's bars to
    a drift check (pneumo.drift); the reduced decode keeps the shares of the full picture.
    """
    top, bottom, left, right = cut
    height, width = gray.shape
    return np.array([(top + bottom) / height, (left + right) / width], dtype=np.float32)


def borders(gray: np.ndarray, config: TransformConfig) -> np.ndarray:
    """``Resampler(gray, config).borders`` without the resampler: (0, 0) unless the recipe trims padding."""
    return trimmed_share(gray, padding(gray)) if config.trim_padding else np.zeros(2, np.float32)


class Resampler:
    """One decoded picture, ready to be resampled onto the recipe's canvas, plainly or warped.

    A warp (zoom_x, zoom_y, translate_x, translate_y, rotation) zooms each of the film's axes
    about the centre (> 1 magnifies; unequal zooms change the aspect ratio), translates by
    fractions of width and height and rotates about the centre, all before the crop. Pixels from outside the picture
    repeat its edge, as a film that extends past the detector would look, rather than
    adding black corners. The set-up (a box-filter shrink and the edge padding) is done
    once per picture, so each further rendering costs one small affine resampling.
    """

    # Edge padding prepared up front, as a fraction of the larger side: enough for zooms
    # down to 0.8, translations of 10 % and rotations of 10 degrees; larger warps pad again.
    MARGIN = 0.25

    def __init__(self, gray: np.ndarray, config: TransformConfig):
        # borders: the share of rows and of columns trimmed as padding (0, 0 without trim_padding).
        self.borders = np.zeros(2, np.float32)
        if config.trim_padding:
            cut = padding(gray)
            self.borders = trimmed_share(gray, cut)
            gray = _trimmed(gray, cut)
        self.gray = np.ascontiguousarray(gray, dtype=np.float32)
        self.rows, self.cols = config.grid
        self.out = (self.cols * config.cell_pixels, self.rows * config.cell_pixels)  # (width, height)
        self.crop = config.crop_fraction
        self._padded: tuple[Image.Image, int, int, int] | None = None  # picture, margin, width, height

    def canvas(self, warp: tuple[float, float, float, float, float] | None = None) -> np.ndarray:
        c, (out_w, out_h) = self.crop, self.out
        if warp is None or tuple(warp) == (1.0, 1.0, 0.0, 0.0, 0.0):
            height, width = self.gray.shape
            box = (c * width, c * height, (1 - c) * width, (1 - c) * height)
            picture = Image.fromarray(self.gray)  # mode F
            return np.asarray(picture.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))

        zoom_x, zoom_y, translate_x, translate_y, degrees = warp
        picture, margin, width, height = self._prepared()
        cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        centre_x, centre_y = width / 2, height / 2
        # Output (u, v) -> crop position (x, y) -> picture position: undo the translation, the rotation
        # and the zoom of each of the film's axes (the film is zoomed, then rotated, then translated).
        step_x, step_y = (1 - 2 * c) * width / out_w, (1 - 2 * c) * height / out_h
        x0 = c * width - centre_x - translate_x * width
        y0 = c * height - centre_y - translate_y * height
        a, b, d, e = cos * step_x / zoom_x, sin * step_y / zoom_x, -sin * step_x / zoom_y, cos * step_y / zoom_y
        cx = centre_x + (cos * x0 + sin * y0) / zoom_x
        cy = centre_y + (-sin * x0 + cos * y0) / zoom_y
        xs = (cx, cx + a * out_w, cx + b * out_h, cx + a * out_w + b * out_h)
        ys = (cy, cy + d * out_w, cy + e * out_h, cy + d * out_w + e * out_h)
        need = math.ceil(max(-min(xs), max(xs) - width, -min(ys), max(ys) - height, 0)) + 2
        if need > margin:  # a warp beyond the prepared padding: pad this once more
            picture = Image.fromarray(np.pad(self._reduced(), need, mode="edge"))
            margin = need
        data = (a, b, cx + margin, d, e, cy + margin)
        return np.asarray(picture.transform((out_w, out_h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR))

    def _reduced(self) -> np.ndarray:
        # Shrink a large decode by whole pixels first (a box filter): the affine map samples
        # without anti-aliasing, so it should run at about the canvas's own scale.
        height, width = self.gray.shape
        factor = int(min((1 - 2 * self.crop) * width / self.out[0], (1 - 2 * self.crop) * height / self.out[1]))
        if factor < 2:
            return self.gray
        return np.asarray(Image.fromarray(self.gray).reduce(factor))

    def _prepared(self) -> tuple[Image.Image, int, int, int]:
        if self._padded is None:
            reduced = self._reduced()
            height, width = reduced.shape
            margin = math.ceil(self.MARGIN * max(height, width)) + 2
            self._padded = (Image.fromarray(np.pad(reduced, margin, mode="edge")), margin, width, height)
        return self._padded


def pool_features(canvas: np.ndarray, config: TransformConfig) -> np.ndarray:
    """The canvas pooled per cell, one part per ``config.pooling`` mode, each z-scored if asked.

    ``canvas`` may carry leading axes (a batch of canvases): one vectorized pass for all of
    them, since numpy's per-call overhead outweighs the arithmetic on arrays this small.
    """
    rows, cols = config.grid
    k = config.cell_pixels
    lead = canvas.shape[:-2]
    parts = np.stack([_pooled(canvas, rows, cols, k, mode).reshape(*lead, rows * cols) for mode in config.pooling], axis=-2)
    if config.normalize == "zscore":
        # A blank film has no spread: centre it and leave it at 0 rather than divide by 0.
        mean = parts.mean(axis=-1, keepdims=True)
        spread = np.maximum(parts.std(axis=-1, keepdims=True), 1e-6)
        parts = (parts - mean) / spread
    return parts.reshape(*lead, -1).astype(np.float32, copy=False)


def _pooled(canvas: np.ndarray, rows: int, cols: int, k: int, mode: str) -> np.ndarray:
    """(..., rows, cols): each k x k cell's max or mean, bit for bit numpy's reduction over the cells' two
    axes at once, which runs a short inner loop per cell row (~3x the time of the whole pooling here)."""
    lead = canvas.shape[:-2]
    if mode == "max":  # order-free: a cell's rows first, along whole canvas rows, then its columns
        band = canvas.reshape(*lead, rows, k, cols * k).max(axis=-2)
        return band.reshape(*lead, rows, cols, k).max(axis=-1)
    cells = canvas.reshape(*lead, rows, k, cols, k)
    if k != 8:
        return cells.mean(axis=(len(lead) + 1, len(lead) + 3))
    # numpy sums each cell row of 8 pairwise, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), then adds
    # the rows in order: the same float32 sums, made by whole-array adds (a test holds them equal).
    x = [cells[..., i] for i in range(8)]
    row_sums = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))
    return row_sums.sum(axis=-2) / np.float32(k * k)
