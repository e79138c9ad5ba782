"""Augmented renditions of train images: the same film as another machine or day might show it.

Rendition n of an image is drawn from ``AugmentConfig``'s ranges as the n-th draw of a
generator seeded by (the run's ``augment_seed``, the image's sha256), so it depends on
(image, n, seed) only: not on the shard, the order of images, K, or the process. It is applied to the decoded
picture the transform already holds: geometry through one affine resampling (``transform.Resampler``),
then blur and the photometric changes on the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumo.config import AugmentConfig, TransformConfig
from pneumo.transform import Resampler, pool_features


@dataclass(frozen=True)
class Rendition:
    """One set of changes; the defaults change nothing."""

    zoom: float = 1.0  # > 1 magnifies
    translate_x: float = 0.0  # fraction of the width, + moves the picture right
    translate_y: float = 0.0  # fraction of the height, + moves it down
    rotation: float = 0.0  # degrees
    gamma: float = 1.0  # x ** gamma
    contrast: float = 1.0  # about the canvas mean
    brightness: float = 0.0  # added on the [0, 1] scale
    aspect: float = 0.0  # log of the aspect change: zoom_x = zoom e^aspect, zoom_y = zoom e^-aspect
    blur: float = 0.0  # Gaussian sigma as a fraction of the film's short side; 0 = sharp

    @property
    def warp(self) -> tuple[float, float, float, float, float]:
        """(zoom_x, zoom_y, translate_x, translate_y, rotation) for ``transform.Resampler.canvas``."""
        stretch = float(np.exp(self.aspect))
        return (self.zoom * stretch, self.zoom / stretch, self.translate_x, self.translate_y, self.rotation)


def rendition_rng(seed: int, sha256: str) -> np.random.Generator:
    """The generator of one image's renditions: depends on nothing else."""
    return np.random.default_rng([seed, int(sha256[:32], 16)])


def draw(config: AugmentConfig, rng: np.random.Generator, count: int = 1) -> list[Rendition]:
    """``count`` renditions, every parameter uniform in its range (log-uniform for zoom, gamma, contrast).

    Each rendition takes the next 7 numbers of ``rng``, or 10 when ``config`` asks for aspect
    changes or blur (aspect, whether to blur, sigma): rendition n of an image is the same
    whatever the number of renditions asked for, and recipes without aspect or blur draw
    exactly what they drew before those settings existed (their models stay reproducible).
    """
    extended = bool(config.aspect or config.blur)
    u = rng.uniform(-1.0, 1.0, size=(count, 10 if extended else 7))
    low, high = np.log(config.zoom)
    # Zoom log-uniform: 0.9 and 1.12 are about equally far from 1 in that scale.
    zoom = np.exp(low + (u[:, 0] + 1) / 2 * (high - low))
    renditions = []
    for i in range(count):
        aspect = blur = 0.0
        if extended:
            aspect = float(u[i, 7] * config.aspect)
            if (u[i, 8] + 1) / 2 < config.blur:
                blur = float(config.blur_sigma[0] + (u[i, 9] + 1) / 2 * (config.blur_sigma[1] - config.blur_sigma[0]))
        renditions.append(
            Rendition(
                zoom=float(zoom[i]),
                translate_x=float(u[i, 1] * config.shift),  # AugmentConfig.shift: the largest translation
                translate_y=float(u[i, 2] * config.shift),
                rotation=float(u[i, 3] * config.rotation),
                gamma=float(np.exp(u[i, 4] * config.gamma)),
                contrast=float(np.exp(u[i, 5] * config.contrast)),
                brightness=float(u[i, 6] * config.brightness),
                aspect=aspect,
                blur=blur,
            )
        )
    return renditions


def blurred(canvas: np.ndarray, picture: Resampler, rendition: Rendition) -> np.ndarray:
    """The canvas as if the film had been blurred with sigma ``rendition.blur`` x its short side.

    Blurring the small canvas instead of the decoded film costs next to nothing; the sigma is
    converted to canvas pixels per axis (the canvas squeezes the film to the grid's shape and
    the warp zooms it).
    """
    if not rendition.blur:
        return canvas
    from scipy.ndimage import gaussian_filter  # here: a cached run imports no scipy

    height, width = picture.gray.shape
    (out_w, out_h), kept = picture.out, 1 - 2 * picture.crop
    zoom_x, zoom_y = rendition.warp[:2]
    sigma = rendition.blur * min(height, width)
    return gaussian_filter(canvas, (sigma * zoom_y * out_h / (kept * height), sigma * zoom_x * out_w / (kept * width)), mode="nearest")


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


def _photometric_batch(canvases: np.ndarray, renditions: list[Rendition]) -> np.ndarray:
    """``photometric`` of each canvas (n, h, w) with its own rendition, in one vectorized pass."""
    gamma, contrast, brightness = (
        np.array([getattr(r, name) for r in renditions], np.float32)[:, None, None] for name in ("gamma", "contrast", "brightness")
    )
    out = np.power(np.clip(canvases, 0.0, 1.0), gamma)
    mean = out.mean(axis=(1, 2), keepdims=True)
    return np.clip(mean + (out - mean) * contrast + brightness, 0.0, 1.0).astype(np.float32, copy=False)


def features(picture: np.ndarray | Resampler, config: TransformConfig, rendition: Rendition) -> np.ndarray:
    """The features of a decoded picture (its gray array, or a Resampler of it) under ``rendition``."""
    if not isinstance(picture, Resampler):
        picture = Resampler(picture, config)
    return pool_features(photometric(blurred(picture.canvas(rendition.warp), picture, rendition), rendition), config)


def rendition_features(gray: np.ndarray, config: TransformConfig, sha256: str, renditions: int) -> np.ndarray:
    """(1 + renditions, n_features): the original, then renditions 1..K of one image.

    The original row is exactly ``featurize``'s (what prediction computes); the renditions
    are resampled one by one and then changed and pooled together.
    """
    picture = Resampler(gray, config)
    original = pool_features(picture.canvas(), config)
    if not renditions:
        return original[None]
    drawn = draw(config.augment, rendition_rng(config.augment_seed, sha256), renditions)
    return np.concatenate([original[None], rendered_features(picture, drawn, config)])


def rendered_features(picture: Resampler, renditions: list[Rendition], config: TransformConfig) -> np.ndarray:
    """(len(renditions), n_features): the picture under each rendition, resampled one by one, then
    changed and pooled together."""
    canvases = np.stack([blurred(picture.canvas(r.warp), picture, r) for r in renditions])
    return pool_features(_photometric_batch(canvases, renditions), config)
