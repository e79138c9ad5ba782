"""Predictions in a second: model.onnx on onnxruntime, without importing torch; torch as the fallback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pneumo import registry
from pneumo.predict import CardError, Predictor
from tests.predict_helpers import card, expected_probability, register_two, state_dict, xray_pair


def _imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", stderr, re.M)}


def test_a_version_with_model_onnx_is_scored_on_onnxruntime_as_torch_scores_it(tmp_path, shared_data):
    root = str(tmp_path / "registry")
    weights = register_two(root)
    images = [str(p) for p in xray_pair(shared_data)]
    on_onnx = Predictor.from_registry(root)
    on_torch = Predictor.from_registry(root, runtime="torch")
    assert (on_onnx.runtime, on_torch.runtime) == ("onnxruntime", "torch")
    got = [p.probability for p in on_onnx.predict(images)]
    np.testing.assert_allclose(got, [p.probability for p in on_torch.predict(images)], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, [expected_probability(weights["v0001"], i) for i in images], rtol=0, atol=1e-5)
    assert [p.label for p in on_onnx.predict(images)] == [p.label for p in on_torch.predict(images)]


def test_without_model_onnx_prediction_falls_back_to_torch(tmp_path, monkeypatch, shared_data):
    root = str(tmp_path / "registry")
    weights = state_dict(3)
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "onnx", None)  # registration cannot export: no model.onnx
        registry.register(root, "tinynet", weights, card(weights))
    registry.set_alias(root, "tinynet", "champion", "v0001")
    predictor = Predictor.from_registry(root)
    assert predictor.runtime == "torch"
    image = str(xray_pair(shared_data)[0])
    assert predictor.predict([image])[0].probability == pytest.approx(expected_probability(weights, image), abs=1e-6)


def test_a_model_onnx_that_does_not_match_its_card_is_refused(tmp_path):
    root = tmp_path / "registry"
    register_two(str(root))
    onnx_file = root / "tinynet" / "v0001" / "model.onnx"
    onnx_file.write_bytes((root / "tinynet" / "v0002" / "model.onnx").read_bytes())
    with pytest.raises(CardError, match="model.onnx is corrupt"):
        Predictor.from_registry(str(root))


@pytest.mark.slow
def test_pneumo_predict_does_not_import_torch_when_the_version_has_model_onnx(tmp_path, monkeypatch, shared_data):
    root = str(tmp_path / "registry")
    register_two(root)
    image = str(xray_pair(shared_data)[0])
    command = [sys.executable, "-X", "importtime", "-m", "cli", "predict", image, "--registry", root]
    with_onnx = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert with_onnx.returncode == 0, with_onnx.stderr[-2000:]
    modules = _imported_modules(with_onnx.stderr)
    assert "onnxruntime" in modules and "pneumo.predict" in modules
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
    assert "tinynet v0001 (threshold 0.5, onnxruntime): 1 scored" in with_onnx.stderr
    # The same command on a version without model.onnx does import torch: the check can fail.
    (tmp_path / "registry" / "tinynet" / "v0001" / "model.onnx").unlink()
    card_file = tmp_path / "registry" / "tinynet" / "v0001" / "card.json"
    saved = registry.load_card(root, "tinynet", "v0001").as_json()
    del saved["files"]["model.onnx"]
    card_file.write_text(json.dumps(registry.seal_card(saved)))  # a card edit must be resealed to load
    without = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert without.returncode == 0, without.stderr[-2000:]
    assert "torch" in _imported_modules(without.stderr) and "(threshold 0.5, torch)" in without.stderr
