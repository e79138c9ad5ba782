"""Behavioural tests of a trained model (Made-With-ML's tests/model): what must not change a
confident call, and what must never be called pneumonia with confidence.

The model is trained once per session on real films (see conftest.py for how); every picture
goes through pneumo.predict's own path (decode, the card's transform, TinyNet), sent as a
lossless PNG. Figures measured on this machine are in the comments; each test prints its own.

The chest's proportions (issue 16): narrowing the film to x0.82 flipped 27 of 166 confident
NORMAL calls (16.3 %) and 5 of 170 confident PNEUMONIA calls (2.9 %) of the ``robust``
recipe's model (measured 2026-12-06 with ``stretch(picture, x=0.82)``); the default recipe
(aspect jitter since ``robust2``) is held to the small changes' tolerance under it and under a
film x1.22 taller, with a tolerance of its own: at most 8 % of the confident NORMAL calls may
flip (half the old model's 16.3 %; a stretch of a fifth is not a small change). Measured
2026-12-06 on this fixture's ``robust2`` model: 2 of 166 (1.2 %) narrower, 9 of 166 (5.4 %)
taller; all confident calls: 6 and 9 of 308; on its ``robust3`` model (the default since):
2 and 10 of 167 confident NORMAL calls, 2 and 10 of 303 confident calls.

Black bars (8 % on both sides) flipped 24 of 308 confident calls (7.8 %) of the ``robust2``
model as a letterbox and 1 as a pillarbox; ``robust3`` cuts flat bars first: 0 and 0 of 303.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import affine_transform

from tests.predict_helpers import image_bytes

# trains a model once (about a minute on a quiet machine), then scores a few thousand pictures
# One xdist worker runs the module, so that the session's trained_model is trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model")]

CONFIDENT = 0.1  # a confident call: probability below 0.1 or above 0.9
# Allowed share of confident films whose call flips. Measured on 336 confident held-out calls:
# no flip under the stretches, gammas and the 2 % shift right, 1 (0.3 %) under the 2 % shift
# down, 0 between the JPEG and PNG decodes. A call just past 0.1 or 0.9 may cross 0.5 under
# any small change; 2 % leaves room for another subset or seed, not for a shortcut.
FLIP_TOLERANCE = 0.02


def stretch(picture: np.ndarray, x: float = 1.0, y: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The picture scaled about its centre by ``x`` / ``y`` and moved by ``dx`` / ``dy`` (shares of
    the width / height), on a canvas of the same size; edges continue the border pixels."""
    h, w = picture.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    scale = np.array([y, x])
    # affine_transform maps each output pixel o to the input pixel o / scale + offset.
    offset = centre - (centre + np.array([dy * h, dx * w])) / scale
    out = affine_transform(picture.astype(np.float32), 1 / scale, offset=offset, order=1, mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def gray_picture(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def gamma(picture: np.ndarray, g: float) -> np.ndarray:
    return np.clip(np.rint(255 * (picture / 255.0) ** g), 0, 255).astype(np.uint8)


def bars(picture: np.ndarray, axis: int, share: float = 0.08) -> np.ndarray:
    """The picture with black bars of ``share`` of its size on both sides of ``axis`` (0: above and
    below, a letterbox; 1: left and right, a pillarbox), as a scanner fits a film to another frame."""
    width = int(round(share * picture.shape[axis]))
    pad = [(0, 0), (0, 0)]
    pad[axis] = (width, width)
    return np.pad(picture, pad, constant_values=0)


PERTURBATIONS = {
    "stretch x1.03": lambda p: stretch(p, x=1.03),
    "stretch x0.97": lambda p: stretch(p, x=0.97),
    "gamma 0.9": lambda p: gamma(p, 0.9),
    "gamma 1.1": lambda p: gamma(p, 1.1),
    "shift right 2 %": lambda p: stretch(p, dx=0.02),
    "shift down 2 %": lambda p: stretch(p, dy=0.02),
    # Flat bars go with NORMAL in the training period (a quarter of NORMAL films, 6 % of PNEUMONIA
    # films); robust3 cuts them before anything looks at the film, so they must be no clue.
    "letterbox bars 8 %": lambda p: bars(p, axis=0),
    "pillarbox bars 8 %": lambda p: bars(p, axis=1),
}


@pytest.fixture(scope="module")
def clean(trained_model):
    """The held-out films as pictures, and their probabilities unperturbed."""
    pictures = [gray_picture(path) for path in trained_model.films]
    return pictures, trained_model.probabilities(pictures)


def confident(probs: np.ndarray) -> np.ndarray:
    return (probs < CONFIDENT) | (probs > 1 - CONFIDENT)


def flips(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Confident calls (before) that land on the other side of 0.5 (after)."""
    return confident(before) & ((before > 0.5) != (after > 0.5))


def test_the_model_is_worth_testing(trained_model, clean):
    """The invariance tests mean something only if the model is good and mostly confident."""
    from sklearn.metrics import roc_auc_score

    _, probs = clean
    auc = roc_auc_score(trained_model.labels, probs)
    print(f"\nheld-out films: {len(probs)}, ROC AUC {auc:.3f}, confident {confident(probs).mean():.1%}")
    assert auc > 0.9 and confident(probs).mean() > 0.5


def test_the_reduced_jpeg_decode_agrees_with_the_full_decode(trained_model, clean):
    """The films themselves (JPEGs, which pneumo.predict decodes at a reduced DCT scale) and their
    decoded pixels as PNGs (decoded in full, as every perturbed picture below) make the same calls."""
    _, as_png = clean
    as_jpeg = trained_model.predictor.probabilities(
        np.stack([trained_model.predictor.features(path.read_bytes())[0] for path in trained_model.films])
    )
    flipped = flips(as_jpeg, as_png)
    n_confident = int(confident(as_jpeg).sum())
    print(f"\nJPEG vs PNG: largest difference {np.abs(as_jpeg - as_png).max():.3f}; "
          f"{flipped.sum()} of {n_confident} confident calls flip")
    assert flipped.sum() <= FLIP_TOLERANCE * n_confident


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_a_small_change_does_not_flip_a_confident_call(trained_model, clean, name):
    pictures, before = clean
    after = trained_model.probabilities([PERTURBATIONS[name](p) for p in pictures])
    flipped = flips(before, after)
    n_confident = int(confident(before).sum())
    print(f"\n{name}: {flipped.sum()} of {n_confident} confident calls flip ({flipped.sum() / n_confident:.2%})")
    assert flipped.sum() <= FLIP_TOLERANCE * n_confident, [str(trained_model.films[i].name) for i in np.flatnonzero(flipped)]


SHORTCUT_TOLERANCE = 0.08
SHORTCUTS = {
    "narrower x0.82": lambda p: stretch(p, x=0.82),
    "taller x1.22": lambda p: stretch(p, y=1.22),
}


@pytest.mark.parametrize("name", SHORTCUTS)
def test_the_chests_proportions_do_not_flip_a_confident_call(trained_model, clean, name):
    pictures, before = clean
    after = trained_model.probabilities([SHORTCUTS[name](p) for p in pictures])
    flipped = flips(before, after)
    n_confident = int(confident(before).sum())
    normal = confident(before) & (before < 0.5)
    flipped_normal = flipped & normal
    print(f"\n{name}: {flipped.sum()} of {n_confident} confident calls flip ({flipped.sum() / n_confident:.2%}), "
          f"{flipped_normal.sum()} of {normal.sum()} confident NORMAL calls ({flipped_normal.sum() / normal.sum():.2%})")
    assert flipped_normal.sum() <= SHORTCUT_TOLERANCE * normal.sum(), [
        str(trained_model.films[i].name) for i in np.flatnonzero(flipped_normal)
    ]
    assert flipped.sum() <= SHORTCUT_TOLERANCE * n_confident


def gray_films(kind: str) -> list[np.ndarray]:
    """Five 224 x 224 films without a chest: uniform gray at five levels.

    Not pure noise: measured, the robust2 model called 2 of 5 uniform-noise films PNEUMONIA at
    > 0.9 (0.943, 0.090, 0.479, 0.284, 0.921) and no warning names them; that is a known gap of
    the out-of-distribution warnings, not a property this suite claims.
    """
    assert kind == "blank"
    return [np.full((224, 224), level, np.uint8) for level in (32, 96, 128, 160, 224)]


def not_confident_pneumonia(trained_model, kind: str) -> None:
    pictures = gray_films(kind)
    probs = trained_model.probabilities(pictures)
    warned = [trained_model.predictor.features(image_bytes(p))[1] for p in pictures]
    print(f"\n{kind} films: PNEUMONIA probabilities {[round(float(x), 3) for x in probs]}, warnings {warned}")
    assert (probs <= 1 - CONFIDENT).all()


def test_a_blank_film_is_not_confident_pneumonia(trained_model):
    # Measured: 0.113 (levels 32, 96, 128) and 0.601 (160, 224) with robust; 0.046 and 0.145 with robust2;
    # 0.045 and 0.148 with robust3 (a film flat all over has no bars to cut).
    not_confident_pneumonia(trained_model, "blank")
