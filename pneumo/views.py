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
film is decoded once and resampled per view (``transform.Resampler``), about 0.1-0.2 ms each.

Issue 24 measured, on the carved stress val: 16 views lift TinyNet's AUC from 0.972 to 0.978;
the training renditions' own (wider, photometric) ranges as views did worse (0.975).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import numpy as np

from pneumo import augment
from pneumo.augment import Rendition
from pneumo.config import AugmentConfig, TransformConfig, ViewConfig
from pneumo.transform import Resampler, pool_features

VIEW_STREAM = 2_000  # keeps the views' draws apart from the renditions' and the shift suite's


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


def view_features(picture: Resampler, config: TransformConfig, sha256: str) -> np.ndarray:
    """(views.count, n_features): the decoded film under each of its views (geometry only: the
    renditions' exposure step, the identity here, would cost as much as the resampling)."""
    drawn = draw_views(config.views, sha256)
    if not drawn:
        return np.zeros((0, config.n_features), np.float32)
    return pool_features(np.stack([picture.canvas(view.warp) for view in drawn]), config)


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
    """(len(shift.SHIFTS), views.count, n_features): each film of the shift suite under the film's views.

    Not stored in shards (24 x 16 resamplings per film): benchmarks/quality.py scores the shift suite
    with views from it."""
    from pneumo import shift  # here: pneumo.shift is the shard writers' module

    drawn = draw_views(config.views, sha256)
    plain = Resampler(gray, config)
    out = []
    for number, chosen in enumerate(shift.SHIFTS):
        picture = plain
        if chosen.pixels is not None:  # as shift.shift_features draws them
            rng = np.random.default_rng([config.shift_seed, int(sha256[:32], 16), number])
            picture = Resampler(chosen.pixels(gray, rng), config)
        out.append(augment.rendered_features(picture, [composed(chosen.rendition, view) for view in drawn], config))
    return np.stack(out)
