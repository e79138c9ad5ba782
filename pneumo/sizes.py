"""Stage 2: width and height percentiles of the dataset, read from image headers only.

The transform resizes every image to one size; the seed took the 75th percentile of the
dataset's sizes (1000 x 1300). Opening an image with PIL parses its header and stops:
pixels are decoded only by ``load()``, which this module never calls, so a pass over
100,000 X-rays costs seconds, not minutes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from pneumo.dicom import DicomRejected
from pneumo.images import FormatNotAllowed, header_size
from pneumo.manifest import CLASSES, Manifest, QuarantineEntry

DEFAULT_PERCENTILES = (25, 50, 75, 90, 99)


class SizeStats(BaseModel):
    n: int  # images whose size could be read
    percentiles: list[float]
    overall: dict[str, dict[str, float]]  # {"width": {"p25": ...}, "height": {...}}
    per_class: dict[str, dict[str, dict[str, float]]]  # class name -> like overall; only classes with images
    unreadable: list[QuarantineEntry] = []


def percentile_key(percentile: float) -> str:
    """``75`` -> ``"p75"``, ``99.5`` -> ``"p99.5"``."""
    return f"p{float(percentile):g}"


def with_default_percentiles(percentile: float) -> tuple[float, ...]:
    """DEFAULT_PERCENTILES plus the one the target size is read at, sorted, each once."""
    return tuple(sorted({*DEFAULT_PERCENTILES, percentile}))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as displayed, from its header alone."""
    with warnings.catch_warnings():
        # Sizes are only read here; refusing big images is the transform's job.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return header_size(path)  # the transform's allow-list (JPEG, PNG, BMP, DICOM), from the header alone


def _unreadable_reason(error: Exception) -> str:
    if isinstance(error, (FormatNotAllowed, DicomRejected)):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to open ({error})"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return "truncated header"
    return f"unreadable header ({type(error).__name__}: {error})"


def _summary(widths: list[int], heights: list[int], percentiles: list[float]) -> dict[str, dict[str, float]]:
    out = {}
    for axis, values in (("width", widths), ("height", heights)):
        points = np.percentile(np.asarray(values, dtype=np.float64), percentiles)
        out[axis] = {percentile_key(p): float(v) for p, v in zip(percentiles, points)}
    return out


def size_percentiles(
    manifest: Manifest,
    percentiles=DEFAULT_PERCENTILES,
    progress: Callable[[int, int], None] | None = None,
) -> SizeStats:
    """Width and height percentiles over the manifest, overall and per class.

    A file whose header cannot be read is listed in ``unreadable`` and left out of the
    percentiles. ``progress(done, total)`` is called after every image.
    """
    percentiles = [float(p) for p in percentiles]
    if not percentiles or any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must be numbers in [0, 100], got {percentiles}")
    root = Path(manifest.images_root())
    sizes: dict[int, tuple[list[int], list[int]]] = {label: ([], []) for label in range(len(CLASSES))}
    unreadable = []
    total = len(manifest.records)
    for done, record in enumerate(manifest.records, start=1):
        try:
            width, height = image_size(root / record.relpath)
        except FileNotFoundError:
            raise  # a missing file means a wrong root, not a bad image: say so loudly
        except Exception as error:  # PIL raises many types for bad headers; each becomes a reason
            unreadable.append(QuarantineEntry(relpath=record.relpath, stage="sizes", reason=_unreadable_reason(error)))
        else:
            sizes[record.label][0].append(width)
            sizes[record.label][1].append(height)
        if progress:
            progress(done, total)

    all_widths = [w for widths, _ in sizes.values() for w in widths]
    all_heights = [h for _, heights in sizes.values() for h in heights]
    return SizeStats(
        n=len(all_widths),
        percentiles=percentiles,
        overall=_summary(all_widths, all_heights, percentiles) if all_widths else {},
        per_class={
            CLASSES[label]: _summary(widths, heights, percentiles)
            for label, (widths, heights) in sizes.items()
            if widths
        },
        unreadable=unreadable,
    )


def target_size(stats: SizeStats, percentile: float) -> tuple[int, int]:
    """(height, width) at the given overall percentile, rounded to whole pixels."""
    if not stats.overall:
        raise ValueError(f"no readable image sizes ({len(stats.unreadable)} unreadable); cannot choose a target size")
    key = percentile_key(percentile)
    if key not in stats.overall["width"]:
        available = ", ".join(f"{p:g}" for p in stats.percentiles)
        raise ValueError(f"percentile {percentile:g} was not computed; available: {available}")
    return round(stats.overall["height"][key]), round(stats.overall["width"][key])


class SizesRef(BaseModel):
    """What the size stage hands downstream: the stats file and the resolved target size."""

    model_config = ConfigDict(frozen=True)

    uri: str
    percentile: float
    size: tuple[int, int]  # (height, width) every image is resized to
    n: int


def table_rows(stats: SizeStats) -> list[dict]:
    """One row per group (overall, then each class) and axis, one column per percentile."""
    groups = {"all": stats.overall, **stats.per_class}
    return [
        {"group": group, "axis": axis, **{key: round(value) for key, value in summary[axis].items()}}
        for group, summary in groups.items()
        if summary
        for axis in ("width", "height")
    ]
