"""Pictures that are not chest films carry an out-of-distribution warning (issue 23 item 9, issue 24);
real films of held-out patients almost never do."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.predict_helpers import image_bytes

OOD = "out of distribution"
# With test_behaviour on one worker: the session's trained model (tests/model/conftest.py) is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model")]


def _gradient() -> bytes:
    return image_bytes(np.tile(np.linspace(0, 255, 224).astype(np.uint8), (224, 1)))


def _blobs() -> bytes:
    # Gray colour blobs: soft discs of gray levels on a mid-gray ground, saved as RGB.
    picture = Image.new("RGB", (224, 224), (128, 128, 128))
    draw = ImageDraw.Draw(picture)
    rng = np.random.default_rng(1)
    for _ in range(12):
        x, y, r, level = *rng.integers(0, 224, 2), int(rng.integers(15, 50)), int(rng.integers(40, 230))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(level, level, level))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def _noise(size: int = 224, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _noise_rgb_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(seed=3)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _text_page() -> bytes:
    page = Image.new("L", (600, 800), 255)
    draw = ImageDraw.Draw(page)
    for line in range(40):
        draw.text((30, 15 + 19 * line), f"{line:02d} The quick brown fox jumps over the lazy dog, 0123456789", fill=0)
    return image_bytes(np.asarray(page))


NOT_FILMS = {
    "plain gray gradient": _gradient,
    "gray colour blobs": _blobs,
    "gray noise": lambda: image_bytes(_noise()),
    "gray noise as an RGB JPEG": _noise_rgb_jpeg,
    "a page of text": _text_page,
    "1024 x 1024 noise": lambda: image_bytes(_noise(1024, seed=4)),
    "an 8 x 8 image": lambda: image_bytes(_noise(8, seed=5)),
}


@pytest.mark.parametrize("name", sorted(NOT_FILMS))
def test_a_picture_that_is_no_chest_film_is_flagged_out_of_distribution(trained_model, name):
    (prediction,) = trained_model.predictor.predict([(name, NOT_FILMS[name]())])
    print(f"\n{name}: probability {prediction.probability:.3f}, distance {prediction.distance:.1f} "
          f"(cut-off {trained_model.predictor.ood_cutoff:.1f}), warnings {prediction.warnings}")
    assert prediction.ok and prediction.distance > trained_model.predictor.ood_cutoff
    assert any(w.startswith(OOD) for w in prediction.warnings), prediction.warnings


def test_held_out_films_are_rarely_flagged(trained_model):
    """At most 1 in 100 real films of patients the model never saw (measured over all 5,216 shared films in
    the notes: benchmarks/ood.py)."""
    predictions = trained_model.predictor.predict(trained_model.films)
    flagged = [p.input for p in predictions if any(w.startswith(OOD) for w in p.warnings)]
    print(f"\n{len(flagged)} of {len(predictions)} held-out films flagged")
    assert all(p.ok and p.distance is not None for p in predictions)
    assert len(flagged) <= 0.01 * len(predictions), flagged
