"""ONNX export on registration: the network only, numerically the same as torch."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pneumo import export, model, registry
from tests.predict_helpers import card, state_dict


def test_registration_writes_model_onnx_that_matches_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    root = tmp_path / "registry"
    weights = state_dict(7)
    version = registry.register(str(root), "tinynet", weights, card(weights))
    folder = root / "tinynet" / version
    saved = json.loads((folder / "card.json").read_text())
    assert saved["export"] == {"onnx": "written"}
    assert saved["files"]["model.onnx"]["bytes"] == (folder / "model.onnx").stat().st_size
    assert "model.pt" in saved["files"]  # the card's other entries are kept

    rows = np.random.default_rng(0).random((300, 140), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {export.INPUT_NAME: rows})[0]
    torch_probs = model.predict_proba(weights, rows)
    assert onnx_probs.shape == torch_probs.shape == (300,)
    np.testing.assert_allclose(onnx_probs, torch_probs, rtol=0, atol=1e-5)


def test_without_onnx_registration_skips_the_export_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    root = tmp_path / "registry"
    weights = state_dict(7)
    version = registry.register(str(root), "tinynet", weights, card(weights))
    saved = json.loads((root / "tinynet" / version / "card.json").read_text())
    assert saved["export"]["onnx"].startswith("skipped: the onnx package is not installed")
    assert "model.onnx" not in saved["files"] and not (root / "tinynet" / version / "model.onnx").exists()
    assert registry.list_versions(str(root), "tinynet") == [version]
