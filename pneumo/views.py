"""Test-time views: a film scored as the mean probability over itself and K mild views of it.

The one place a score is made from a film's rows (``film_scores``): the card's val, test and
stress-val figures, its threshold, the champion comparison (pneumo.evaluate, pneumo.promotion)
and every prediction (pneumo.predict: ``pneumo predict``, ``serve``, the batch flow, on torch
or onnxruntime) go through it, so the card's figures are what a user gets.

A view is a small geometric change of the decoded film (``ViewConfig``'s ranges: zoom, translation,
rotation, aspect; no exposure change, no blur), drawn by a generator seeded by (``views.seed``,
the digest of the decoded picture: ``picture_key``): a film always gets the same views, whatever
else is scored with it and whatever file holds it (a JPEG, a PNG or a DICOM copy of the same
pixels: seeded by the file's bytes, a film's DICOM copy scored up to 0.13 away from it). The
film is decoded once and resampled per view (``transform.Resampler``), about 0.15 ms of CPU each. (One numpy
gather for all K views with PIL's arithmetic, bit for bit the same canvases, was tried: no faster than the
K PIL calls on this machine, 2.5 against 2.3 ms per 16 views.)

Issue 24 measured, on the carved stress val: 16 views lift TinyNet's AUC from 0.972 to 0.978;
the training renditions' own (wider, photometric) ranges as views did worse (0.975).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Optional

import numpy as np

from pneumo import augment
from pneumo.augment import Rendition
from pneumo.config import AugmentConfig, TransformConfig, ViewConfig
from pneumo.transform import Resampler, pool_features

VIEW_STREAM = 2_000  # keeps the views' draws apart from the renditions' and the shift suite's


@functools.lru_cache(maxsize=16)  # a pydantic model per film would cost as much as a view
def _ranges(views: ViewConfig) -> AugmentConfig:
    """The views' ranges as renditions: geometry only (gamma, contrast, brightness and blur off)."""
    return AugmentConfig(zoom=views.zoom, shift=views.shift, rotation=views.rotation, aspect=views.aspect,
                         gamma=0.0, contrast=0.0, brightness=0.0, blur=0.0)


def picture_key(picture: Resampler) -> str:
    """The hex sha256 that seeds a film's views: of its decoded picture's 8-bit levels and shape, not of its file."""
    levels = np.rint(np.clip(picture.gray, 0.0, 1.0) * 255.0).astype(np.uint8)
    return hashlib.sha256(np.asarray(levels.shape, np.int64).tobytes() + levels.tobytes()).hexdigest()


def draw_views(views: ViewConfig, sha256: str) -> list[Rendition]:
    """The ``views.count`` views of the film whose picture has this key (``picture_key``, hex)."""
    rng = np.random.default_rng([views.seed, int(sha256[:32], 16), VIEW_STREAM])
    return augment.draw(_ranges(views), rng, views.count)


def view_warps(views: ViewConfig, sha256: str) -> list[tuple[float, float, float, float, float]]:
    """``[view.warp for view in draw_views(views, sha256)]``, the same numbers, from the generator's draws
    at once (``augment.draw`` builds a Rendition per view, which costs as much as resampling it)."""
    ranges = _ranges(views)
    rng = np.random.default_rng([views.seed, int(sha256[:32], 16), VIEW_STREAM])
    u = rng.uniform(-1.0, 1.0, size=(views.count, 10 if ranges.aspect or ranges.blur else 7))  # as augment.draw
    low, high = np.log(ranges.zoom)
    zoom = np.exp(low + (u[:, 0] + 1) / 2 * (high - low))
    stretch = np.exp(u[:, 7] * ranges.aspect) if u.shape[1] == 10 else np.ones(views.count)
    return list(zip((zoom * stretch).tolist(), (zoom / stretch).tolist(), (u[:, 1] * ranges.shift).tolist(),
                    (u[:, 2] * ranges.shift).tolist(), (u[:, 3] * ranges.rotation).tolist()))


def view_features(picture: Resampler, config: TransformConfig, sha256: str) -> np.ndarray:
    """(views.count, n_features): the decoded film under each of its views (geometry only: the
    renditions' exposure step, the identity here, would cost as much as the resampling)."""
    if not config.views.count:
        return np.zeros((0, config.n_features), np.float32)
    return pool_features(np.stack([picture.canvas(warp) for warp in view_warps(config.views, sha256)]), config)


def composed(jitter: Rendition, view: Rendition) -> Rendition:
    """A view of an already jittered film (the stress val's): zooms multiply, translations, rotations and
    aspects add, the jitter's exposure and blur stay. (Exact for zoom and aspect; a first-order composition
    of translation and rotation, which differ from it by a fraction of a pixel of the canvas at these ranges.)"""
    return Rendition(
        zoom=jitter.zoom * view.zoom, translate_x=jitter.translate_x + view.translate_x,
        translate_y=jitter.translate_y + view.translate_y, rotation=jitter.rotation + view.rotation,
        gamma=jitter.gamma, contrast=jitter.contrast, brightness=jitter.brightness,
        aspect=jitter.aspect + view.aspect, blur=jitter.blur,
    )


def jittered_view_features(picture: Resampler, config: TransformConfig, sha256: str, jitters: list[Rendition]) -> np.ndarray:
    """(len(jitters), views.count, n_features): each jittered film under the film's views."""
    drawn = draw_views(config.views, sha256)
    if not drawn:
        return np.zeros((len(jitters), 0, config.n_features), np.float32)
    both = [composed(jitter, view) for jitter in jitters for view in drawn]
    return augment.rendered_features(picture, both, config).reshape(len(jitters), len(drawn), config.n_features)


def film_scores(
    probabilities: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, views: Optional[np.ndarray] = None
) -> np.ndarray:
    """(n,) scores of n films: the mean of the probabilities of each film's row (``rows``, (n, F)) and of its
    views (``views``, (n, K, F)); with no views (None or K = 0), the row's own probability."""
    if views is None or views.shape[1] == 0 or len(rows) == 0:
        return np.asarray(probabilities(rows), dtype=np.float32).reshape(len(rows))
    n, k, n_features = views.shape
    # One call of the network for the films and their views: each call costs a thread-pool round
    # (torch's or onnxruntime's), which on a busy machine outweighs the rows themselves.
    every = np.asarray(probabilities(np.concatenate([rows, views.reshape(n * k, n_features)])), dtype=np.float32).ravel()
    own, viewed = every[:n], every[n:].reshape(n, k)
    return np.concatenate([own[:, None], viewed], axis=1).mean(axis=1)


def shifted_view_features(gray: np.ndarray, config: TransformConfig, sha256: str) -> np.ndarray:
    """(len(shift.SHIFTS), views.count, n_features): each film of the shift suite under the film's views
    (``sha256``, the file's, seeds the shifts' pixel noise as at shard time).

    A shifted film's view is made as prediction makes a view (``view_features``: the canvas of the view's
    warp, here composed with the shift's geometry) with the shift's exposure change applied as
    ``shift.shift_features`` applies it. The exposure shifts (gamma, contrast, brightness) change the canvas
    only: their views start from the plain film's view canvases, resampled once for all six."""
    from pneumo import shift  # here: pneumo.shift is the shard writers' module

    plain = Resampler(gray, config)
    drawn = draw_views(config.views, picture_key(plain))  # the film's own views, as prediction draws them
    plain_views = None  # the plain film's view canvases
    canvases = []
    for number, chosen in enumerate(shift.SHIFTS):
        warps = [composed(chosen.rendition, view).warp for view in drawn]
        if chosen.pixels is None and chosen.rendition.warp == Rendition().warp:
            plain_views = plain_views or [plain.canvas(warp) for warp in warps]
            geometry = plain_views
        else:
            picture = plain
            if chosen.pixels is not None:  # as shift.shift_features draws them
                rng = np.random.default_rng([config.shift_seed, int(sha256[:32], 16), number])
                picture = Resampler(chosen.pixels(gray, rng), config)
            geometry = [picture.canvas(warp) for warp in warps]
        canvases.extend(augment.photometric(canvas, chosen.rendition) for canvas in geometry)
    if not canvases:
        return np.zeros((len(shift.SHIFTS), 0, config.n_features), np.float32)
    return pool_features(np.stack(canvases), config).reshape(len(shift.SHIFTS), len(drawn), config.n_features)


def shift_scores(
    probabilities: Callable[[np.ndarray], np.ndarray], shifted: dict[str, np.ndarray], films: list[bytes],
    config: TransformConfig, chunk: int = 32,
) -> dict[str, np.ndarray]:
    """Shift name -> (n,) scores of the shift suite's films, each scored as every film is (``film_scores``):
    the stored shifted row (``shifted[name]``, (n, F)) and its views, made here from the film's own bytes
    (``films``, as the val and test shards keep them) by ``shifted_view_features``. Storing the views'
    rows instead would take 24 x K rows per film (~215 KB at K = 16, against ~7 KB for a 224 px film's bytes)."""
    from pneumo import shift
    from pneumo.images import decode_gray

    if list(shifted) != list(shift.NAMES):
        raise ValueError(f"the shift suite's rows are of {sorted(shifted)}, this code's suite is {list(shift.NAMES)}")
    n = len(films)
    scores = np.empty((n, len(shift.NAMES)), np.float32)
    stacked = np.stack([shifted[name] for name in shift.NAMES], axis=1)  # (n, shifts, F)
    for start in range(0, n, chunk):  # a chunk of films per network call; memory bounded by the chunk
        part = films[start : start + chunk]
        viewed = np.stack([shifted_view_features(decode_gray(film, config), config, hashlib.sha256(film).hexdigest()) for film in part])
        m, shifts, k, n_features = viewed.shape
        rows = stacked[start : start + m].reshape(m * shifts, n_features)
        scores[start : start + m] = film_scores(probabilities, rows, viewed.reshape(m * shifts, k, n_features)).reshape(m, shifts)
    return {name: scores[:, i] for i, name in enumerate(shift.NAMES)}
