"""The pictures of a version: valid PNGs, deterministic, fast, written to local and S3 registries."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from pneumo import plots, storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = {
    "roc.png", "precision_recall.png", "confusion_matrix.png", "score_histogram.png",
    "reliability.png", "learning_curves.png", "shift_suite.png",
}


def predictions(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) >= 0.375).astype(int)
    p = 1 / (1 + np.exp(-(np.where(y == 1, 1.2, -0.8) + rng.normal(0, 1, n))))
    return y, p


def shift_results(seed: int):
    """The shape pneumo.shift.shift_metrics returns."""
    rng = np.random.default_rng(seed)
    names = ["zoom_out", "zoom_in", "gamma_low", "gamma_high", "blur", "jpeg", "letterbox", "low_res"]
    per_shift = {n: {"roc_auc": 0.8 + 0.15 * rng.random(), "specificity": 0.4 + 0.5 * rng.random(),
                     "sensitivity": 0.9, "accuracy": 0.8} for n in names}
    return {
        "per_shift": per_shift,
        "clean": {"roc_auc": 0.97, "specificity": 0.9, "sensitivity": 0.95, "accuracy": 0.93},
        "worst": {"roc_auc": (min(v["roc_auc"] for v in per_shift.values()), "blur")},
    }


@pytest.fixture(scope="module")
def pngs():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e + 0.01 * e, "val_auc": 0.9 + 0.001 * e}
               for e in range(1, 61)]
    preds = {"val": predictions(520, 0), "test": predictions(780, 1)}
    shift = {"val": shift_results(0), "test": shift_results(1)}
    # CPU time, not wall time: the test machine's cores are shared.
    started = time.process_time()
    out = plots.render_all(preds, 0.5, history, best_epoch=40, shift=shift)
    seconds = time.process_time() - started
    return out, seconds, (preds, history, shift)


def assert_valid_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 300 <= width <= 2000 and 250 <= height <= 2000, image.size
        assert "Software" not in image.info  # no tag, no timestamp: same inputs, same bytes


def test_every_picture_is_a_valid_png(pngs):
    out, _, _ = pngs
    assert set(out) == ALL
    for data in out.values():
        assert_valid_png(data)


def test_pictures_are_deterministic(pngs):
    out, _, (preds, history, shift) = pngs  # their time is a benchmark's figure, not a test's (benchmarks/README.md)
    assert plots.render_all(preds, 0.5, history, best_epoch=40, shift=shift) == out


def test_no_shift_chart_without_shift_results():
    out = plots.render_all({"val": predictions(100, 0)}, 0.5, [])
    assert set(out) == ALL - {"learning_curves.png", "shift_suite.png"}


def test_single_class_split_still_draws():
    y = np.ones(30, dtype=int)
    out = plots.render_all({"val": (y, np.linspace(0, 1, 30))}, 0.5, [])
    assert set(out) == ALL - {"learning_curves.png", "shift_suite.png"}  # every picture, not none
    for data in out.values():
        assert_valid_png(data)


@pytest.mark.slow  # an S3 endpoint: in `make test`, not `make test-fast`
@pytest.mark.parametrize("where", ["local", "s3"])
def test_written_beside_the_card(pngs, where, tmp_path, request):
    out, _, _ = pngs
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/registry"
    folder = storage.join(root, "tinynet", "v0001")
    uris = plots.write_all(folder, out)
    assert sorted(uris) == sorted(storage.join(folder, name) for name in out)
    for name, data in out.items():
        stored = storage.read_bytes(storage.join(folder, name))
        assert stored == data
        assert_valid_png(stored)
    with pytest.raises(storage.AlreadyExists):  # a version's files are never replaced
        plots.write_all(folder, {"roc.png": out["roc.png"]})
