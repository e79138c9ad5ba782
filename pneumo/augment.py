"""Augmented renditions of train images: the same film as another machine or day might show it.

A rendition is drawn from ``AugmentConfig``'s ranges with a generator seeded by (the run's
``augment_seed``, the image's sha256, the rendition number), so it does not depend on the
shard, the order of images or the process that computes it. It is applied to the decoded
picture the transform already holds: geometry through ``transform.render``'s one affine
resampling, then the photometric changes on the canvas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pneumo.config import AugmentConfig, TransformConfig
from pneumo.transform import pool_features, render


@dataclass(frozen=True)
class Rendition:
    """One set of changes; the defaults change nothing."""

    zoom: float = 1.0  # > 1 magnifies
    shift_x: float = 0.0  # fraction of the width, + moves the picture right
    shift_y: float = 0.0  # fraction of the height, + moves it down
    rotation: float = 0.0  # degrees
    gamma: float = 1.0  # x ** gamma
    contrast: float = 1.0  # about the canvas mean
    brightness: float = 0.0  # added on the [0, 1] scale

    @property
    def warp(self) -> tuple[float, float, float, float]:
        return (self.zoom, self.shift_x, self.shift_y, self.rotation)


def rendition_rng(seed: int, sha256: str, number: int) -> np.random.Generator:
    """The generator of one image's rendition ``number``: depends on nothing else."""
    return np.random.default_rng([seed, int(sha256[:32], 16), number])


def draw(config: AugmentConfig, rng: np.random.Generator) -> Rendition:
    """A rendition with every parameter uniform in its range (log-uniform for gamma and contrast)."""
    u = rng.uniform(-1.0, 1.0, size=6)
    low, high = config.zoom
    # Zoom log-uniform too: 0.9 and 1.12 are about equally far from 1 in that scale.
    zoom = math.exp(math.log(low) + (u[0] + 1) / 2 * (math.log(high) - math.log(low)))
    return Rendition(
        zoom=zoom,
        shift_x=float(u[1] * config.shift),
        shift_y=float(u[2] * config.shift),
        rotation=float(u[3] * config.rotation),
        gamma=math.exp(u[4] * config.gamma),
        contrast=math.exp(u[5] * config.contrast),
        brightness=float(rng.uniform(-1.0, 1.0) * config.brightness),
    )


def photometric(canvas: np.ndarray, rendition: Rendition) -> np.ndarray:
    """Gamma, then contrast about the mean, then brightness; clipped to [0, 1] like a real exposure."""
    out = canvas
    if rendition.gamma != 1.0:
        out = np.power(np.clip(out, 0.0, 1.0), rendition.gamma)
    if rendition.contrast != 1.0:
        mean = out.mean()
        out = mean + (out - mean) * rendition.contrast
    if rendition.brightness != 0.0:
        out = out + rendition.brightness
    if out is canvas:
        return canvas
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def features(gray: np.ndarray, config: TransformConfig, rendition: Rendition) -> np.ndarray:
    """The features of the decoded picture ``gray`` under ``rendition``."""
    return pool_features(photometric(render(gray, config, rendition.warp), rendition), config)


def rendition_features(gray: np.ndarray, config: TransformConfig, sha256: str, renditions: int) -> np.ndarray:
    """(1 + renditions, n_features): the original, then renditions 1..K of one image."""
    rows = [pool_features(render(gray, config), config)]
    for number in range(1, renditions + 1):
        rendition = draw(config.augment, rendition_rng(config.augment_seed, sha256, number))
        rows.append(features(gray, config, rendition))
    return np.stack(rows)
