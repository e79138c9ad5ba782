"""Registered models for the predict, CLI and serve tests: schema-2 cards built by hand."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumo import registry
from pneumo.config import TrainConfig, TransformConfig, seed_train, seed_transform
from pneumo.model import TinyNet

# The shared data's images are 224 x 224: the size the pipeline's percentile would pick.
TRANSFORM = seed_transform(size=(224, 224))


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A TinyNet with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyNet(n_features=TRANSFORM.n_features)
    with torch.no_grad():
        for norm in (model.norm1, model.norm2):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def card(weights: dict[str, torch.Tensor], threshold: float = 0.5, transform: TransformConfig = TRANSFORM) -> dict:
    """A schema_version 2 card as the shared contract describes it."""
    buffer = io.BytesIO()
    torch.save(dict(weights), buffer)
    data = buffer.getvalue()
    return {
        "schema_version": 2,
        "recipe": "seed",
        "threshold": threshold,
        "labels": {"0": "NORMAL", "1": "PNEUMONIA"},
        "confusion_matrix_layout": "[[tn, fp], [fn, tp]]: rows = truth (NORMAL, PNEUMONIA), columns = prediction",
        "config": {"transform": transform.model_dump(mode="json"), "train": seed_train(threshold=threshold).model_dump(mode="json")},
        "files": {"model.pt": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "metrics": {"val": {"n": 10, "accuracy": 0.8, "roc_auc": 0.9}, "test": {"n": 10, "accuracy": 0.7, "roc_auc": 0.85}},
        "training": {"history": []},
    }


def register_two(root: str, model_name: str = "tinynet") -> dict[str, dict[str, torch.Tensor]]:
    """v0001 (champion, threshold 0.5) and v0002 (latest, threshold 0.3); their weights by version."""
    weights = {"v0001": state_dict(1), "v0002": state_dict(2)}
    for version, threshold in (("v0001", 0.5), ("v0002", 0.3)):
        assert registry.register(root, model_name, weights[version], card(weights[version], threshold)) == version
    registry.set_alias(root, model_name, "champion", "v0001")
    registry.set_alias(root, model_name, "latest", "v0002")
    return weights


def expected_probability(weights: dict[str, torch.Tensor], path: str | Path) -> float:
    """The training side: featurize with the card's transform, then the network in eval mode."""
    from pneumo import model
    from pneumo.transform import featurize

    return float(model.predict_proba(weights, featurize(path, TRANSFORM)[None, :])[0])


def image_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    # PNG is lossless at every level: level 1 encodes a film in ~2 ms, the default 6 in ~6 ms (thousands per session).
    Image.fromarray(array).save(buffer, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buffer.getvalue()


def xray_pair(shared_data: Path) -> tuple[Path, Path]:
    """The first NORMAL and the first PNEUMONIA image of the shared data."""
    return (
        sorted((shared_data / "train" / "NORMAL").iterdir())[0],
        sorted((shared_data / "train" / "PNEUMONIA").iterdir())[0],
    )


def register_with_reference(root: str, shared_data: Path, model_name: str = "tinynet", films: int = 300) -> str:
    """A champion whose reference.json is built as registration builds it, from real films (the seed transform):
    the first ``films`` of each class alternate between its "training" and its "val" films."""
    from pneumo import reference
    from pneumo.model import predict_proba
    from pneumo.transform import featurize

    paths = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((shared_data / "train" / name).iterdir())[: films // 2]]
    features = np.stack([featurize(path, TRANSFORM) for path in paths])
    weights = state_dict(1)
    ref = reference.build(features[::2], predict_proba(weights, features[1::2]), val_features=features[1::2])
    version = registry.register(root, model_name, weights, card(weights), extra_files={reference.REFERENCE_NAME: ref.to_json()})
    registry.set_alias(root, model_name, "champion", version)
    return version


def negative_films(shared_data: Path, target: Path, n: int, skip: int = 200) -> Path:
    """``n`` real films (past the first ``skip`` of each class) as negatives: a batch unlike every training film."""
    from PIL import ImageOps

    target.mkdir(parents=True)
    paths = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((shared_data / "train" / name).iterdir())[skip: skip + n // 2]]
    for path in paths[:n]:
        with Image.open(path) as image:
            ImageOps.invert(image.convert("L")).save(target / path.name, quality=90)
    return target
