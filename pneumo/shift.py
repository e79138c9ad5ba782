"""The shift suite: val and test scored as films from another machine or period would look.

A fixed list of acquisition shifts, each applied to the decoded picture and featurized with
the run's own recipe: the strong ends of the train augmentations (zoom 0.9 / 1.12, translations
of 5 %, rotations of 5 degrees, gamma e^+-0.35, contrast e^+-0.2, brightness +-0.06), plus blur,
JPEG re-compression at quality 30, black bars (letterbox and pillarbox), half resolution and
sensor noise; and stretches of one axis (x0.82 and x1.22 of the width or the height: the
chest's apparent width goes with the label inside the training period, a shortcut that
films of another period do not share). The random parts (bar widths, noise) come from a generator seeded by
(``shift_seed``, the image's sha256, the shift's position), so the suite is the same for
every run of a recipe. Its features are stored in the val and test shards
(``shift_features``), which makes scoring a model under shift as cheap as scoring it clean.

A model that is better on clean val but worse under these shifts is not better: the
held-back films of another period differ from train in exactly such ways.
A recipe that trims padding (``trim_padding``) cuts the letterbox and pillarbox bars before
featurizing: for it those two shifts leave the film's own features, by construction.

The stress val (``stress_features``) asks the same question with random draws instead of
fixed ends: every val or test image under ``STRESS_RENDITIONS`` random strong jitters
(``STRESS``: the widest renditions' ranges, aspect and blur included), from a generator
seeded by (``shift_seed``, the image's sha256) alone, so every recipe and every run is
scored on the same jitters. It is an evaluation set: nothing trains on it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from pneumo import augment
from pneumo.augment import Rendition, photometric
from pneumo.config import AugmentConfig, TransformConfig
from pneumo.transform import Resampler, pool_features

PixelOp = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _blur(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter  # here: ~0.7 s to import, and only shard writers blur

    # sigma 0.75 % of the short side: 1.7 px at 224 px, a soft but readable film.
    return gaussian_filter(gray, sigma=0.0075 * min(gray.shape), mode="nearest")


def _jpeg(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=30)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image, dtype=np.float32) / 255.0


def _bars(axis: int) -> PixelOp:
    def add(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Black bars of 6 to 10 % of the picture on both sides of ``axis``, as a scanner that
        # pads the film to another aspect ratio; the recipe then squeezes the film to fit.
        width = int(round(rng.uniform(0.06, 0.10) * gray.shape[axis]))
        pad = [(0, 0), (0, 0)]
        pad[axis] = (width, width)
        return np.pad(gray, pad, mode="constant", constant_values=0.0)

    return add


def _lowres(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = gray.shape
    picture = Image.fromarray(gray)
    small = picture.resize((max(1, width // 2), max(1, height // 2)), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


def _noise(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(gray + rng.normal(0.0, 0.03, size=gray.shape).astype(np.float32), 0.0, 1.0)


def stretch(axis: str, factor: float) -> Rendition:
    """The film stretched by ``factor`` along one axis ("x": its width, "y": its height), the other kept."""
    log = float(np.log(factor)) / 2 * (1 if axis == "x" else -1)
    return Rendition(zoom=float(np.sqrt(factor)), aspect=log)


@dataclass(frozen=True)
class Shift:
    name: str
    rendition: Rendition = Rendition()  # geometry and exposure, on the canvas
    pixels: PixelOp | None = None  # applied to the decoded picture first


SHIFTS: tuple[Shift, ...] = (
    Shift("zoom_0.9", Rendition(zoom=0.9)),
    Shift("zoom_1.12", Rendition(zoom=1.12)),
    # Translations. Their names are keys of the shards and of registered cards: kept as they are.
    Shift("shift_left", Rendition(translate_x=-0.05)),
    Shift("shift_right", Rendition(translate_x=0.05)),
    Shift("shift_up", Rendition(translate_y=-0.05)),
    Shift("shift_down", Rendition(translate_y=0.05)),
    Shift("rotate_+5", Rendition(rotation=5.0)),
    Shift("rotate_-5", Rendition(rotation=-5.0)),
    Shift("gamma_e+0.35", Rendition(gamma=float(np.exp(0.35)))),
    Shift("gamma_e-0.35", Rendition(gamma=float(np.exp(-0.35)))),
    Shift("contrast_e+0.2", Rendition(contrast=float(np.exp(0.2)))),
    Shift("contrast_e-0.2", Rendition(contrast=float(np.exp(-0.2)))),
    Shift("brightness_+0.06", Rendition(brightness=0.06)),
    Shift("brightness_-0.06", Rendition(brightness=-0.06)),
    Shift("blur", pixels=_blur),
    Shift("jpeg_q30", pixels=_jpeg),
    Shift("letterbox", pixels=_bars(0)),
    Shift("pillarbox", pixels=_bars(1)),
    Shift("lowres_x0.5", pixels=_lowres),
    Shift("noise_0.03", pixels=_noise),
    Shift("stretch_x0.82", stretch("x", 0.82)),
    Shift("stretch_x1.22", stretch("x", 1.22)),
    Shift("stretch_y0.82", stretch("y", 0.82)),
    Shift("stretch_y1.22", stretch("y", 1.22)),
)
NAMES: tuple[str, ...] = tuple(shift.name for shift in SHIFTS)


def shift_features(gray: np.ndarray, config: TransformConfig, sha256: str) -> np.ndarray:
    """(len(SHIFTS), n_features): the decoded picture ``gray`` under every shift, featurized with ``config``."""
    return shift_rows(gray, config, sha256)[0]


def shift_rows(gray: np.ndarray, config: TransformConfig, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """``shift_features``, and (len(SHIFTS), 2) the share of rows and columns each shift's picture had trimmed as
    padding (``Resampler.borders``: the bars of letterbox and pillarbox, which the features do not show)."""
    canvases, borders = [], []
    plain = Resampler(gray, config)  # set up once for every geometric and exposure shift
    for number, shift in enumerate(SHIFTS):
        picture = plain
        if shift.pixels is not None:
            rng = np.random.default_rng([config.shift_seed, int(sha256[:32], 16), number])
            picture = Resampler(shift.pixels(gray, rng), config)
        canvases.append(photometric(picture.canvas(shift.rendition.warp), shift.rendition))
        borders.append(picture.borders)
    return pool_features(np.stack(canvases), config), np.stack(borders)  # pooled together: one pass instead of 20


# The stress val's jitters: the ends of the default recipe's renditions, drawn at random.
STRESS = AugmentConfig(
    zoom=(0.85, 1.2), shift=0.08, rotation=8.0, gamma=0.5, contrast=0.3, brightness=0.08, aspect=0.2, blur=0.3
)
STRESS_RENDITIONS = 10
STRESS_STREAM = 1_000  # keeps the stress draws apart from the shift suite's per-shift generators


def stress_jitters(config: TransformConfig, sha256: str) -> list[Rendition]:
    """The stress val's jitters of the film with this sha256."""
    rng = np.random.default_rng([config.shift_seed, int(sha256[:32], 16), STRESS_STREAM])
    return augment.draw(STRESS, rng, STRESS_RENDITIONS)


def stress_features(gray: np.ndarray, config: TransformConfig, sha256: str) -> np.ndarray:
    """(STRESS_RENDITIONS, n_features): the decoded picture ``gray`` under the stress val's jitters."""
    return augment.rendered_features(Resampler(gray, config), stress_jitters(config, sha256), config)


def _scores(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float | None]:
    from sklearn.metrics import confusion_matrix, roc_auc_score  # here: shard writers import this module, not scoring

    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    two_classes = len(np.unique(labels)) == 2
    return {
        "roc_auc": float(roc_auc_score(labels, probs)) if two_classes else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "accuracy": float((tp + tn) / len(labels)),
    }


def shift_metrics(labels, probs_by_shift: dict[str, np.ndarray], threshold: float) -> dict:
    """AUC, specificity, sensitivity and accuracy per shift, and the worst of each over the shifts.

    ``probs_by_shift`` maps shift names to PNEUMONIA probabilities of the same rows; an entry
    named "clean" (the unshifted features) is reported as "clean" and left out of the worst case.
    "worst" maps each metric to (value, shift name).
    """
    labels = np.asarray(labels).astype(int).ravel()
    per_shift, clean = {}, None
    for name, probs in probs_by_shift.items():
        probs = np.asarray(probs, dtype=np.float64).ravel()
        if len(probs) != len(labels):
            raise ValueError(f"shift {name!r}: {len(probs)} probabilities for {len(labels)} labels")
        scores = _scores(labels, probs, threshold)
        if name == "clean":
            clean = scores
        else:
            per_shift[name] = scores
    worst = {}
    for metric in ("roc_auc", "specificity", "sensitivity", "accuracy"):
        values = [(scores[metric], name) for name, scores in per_shift.items() if scores[metric] is not None]
        worst[metric] = min(values) if values else None
    return {"per_shift": per_shift, "worst": worst, "clean": clean}
