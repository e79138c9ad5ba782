"""A model trained for real on shared X-rays: `pneumo predict` gives the probabilities training gave."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo import model, registry, train
from pneumo.config import TrainConfig, seed_train
from pneumo.transform import featurize
from tests.helpers import run_pneumo
from tests.predict_helpers import TRANSFORM, card


@pytest.mark.slow  # trains a model and runs the CLI
def test_pneumo_predict_matches_training_scores(shared_data, tmp_path):
    paths = {name: sorted((shared_data / "train" / name).iterdir())[:60] for name in ("NORMAL", "PNEUMONIA")}
    files = paths["NORMAL"] + paths["PNEUMONIA"]
    X = np.stack([featurize(path, TRANSFORM) for path in files])  # the shards' code path
    y = np.array([0] * 60 + [1] * 60)
    val = np.arange(len(y)) % 4 == 0
    config = seed_train(epochs=30, patience=30, threshold=0.4)
    result = train.train(X[~val], y[~val], X[val], y[val], config)

    root = str(tmp_path / "registry")
    version = registry.register(root, "tinynet", result.state_dict, card(result.state_dict, threshold=config.threshold))
    registry.set_alias(root, "tinynet", "champion", version)

    chosen = [0, 60]  # a NORMAL and a PNEUMONIA image, scored inside training below
    inside = model.predict_proba(result.state_dict, X[chosen])
    out = run_pneumo("predict", *(str(files[i]) for i in chosen), "--registry", root, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [row["probability"] for row in rows] == pytest.approx(inside.tolist(), abs=1e-6)
    assert [row["label"] for row in rows] == ["PNEUMONIA" if p >= 0.4 else "NORMAL" for p in inside]
    assert all(row["threshold"] == 0.4 and row["model"]["version"] == version for row in rows)
