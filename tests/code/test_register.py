"""Train, evaluate, register and promote as one library call, without Prefect."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from pneumo import register, registry, shard_files, storage
from pneumo.config import SplitConfig, seed_train, seed_transform


def _index(folder, seed=0, n=120) -> str:
    """An index.json with one shard per split of separable synthetic features."""
    rng = np.random.default_rng(seed)
    transform = seed_transform(size=(300, 400))
    results = []
    for split in ("train", "val", "test"):
        labels = (np.arange(n) % 2).astype(np.uint8)
        features = (rng.normal(size=(n, 140)) + labels[:, None] * 0.8).astype(np.float32)
        uri = str(folder / f"{split}-0000.h5")
        spec = shard_files.ShardSpec(
            root=str(folder), manifest_digest="0" * 64, split_config=SplitConfig(), transform=transform,
            split=split, number=0, start=0, stop=n, records=(), uri=uri,
        )
        ids = [f"{split}{i}" for i in range(n)]
        shard_files._write_h5(folder / f"{split}-0000.h5", spec, features, labels, ids, ids, [])
        results.append(shard_files.ShardResult(
            uri=uri, split=split, number=0, count=n,
            class_counts={"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())},
            sha256=shard_files._sha256_file(folder / f"{split}-0000.h5"),
        ))
    return shard_files.write_index(
        results, str(folder / "index.json"), manifest_digest="0" * 64, transform=transform, split_config=SplitConfig()
    )


CONFIG = seed_train(epochs=3, patience=3, threshold=0.4)


@pytest.mark.slow  # trains and registers: in `make test`, not `make test-fast`
def test_train_and_register_writes_a_schema_2_card_and_promotes(tmp_path):
    index_uri = _index(tmp_path)
    reg = str(tmp_path / "reg")
    result = register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    assert result.ref.version == "v0001" and result.is_champion
    assert result.promotion.reason == "no champion yet: the first model becomes champion"
    card = registry.load_card(reg, "tinynet", "v0001")
    assert card.schema_version == 2 and card.recipe == "seed" == card.config.recipe
    assert card.labels == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert card.confusion_matrix_layout.startswith("[[tn, fp], [fn, tp]]")
    assert card.threshold == 0.4 == card.config.train["threshold"]
    # model.pt, model.onnx and the pictures, each with the sha256 of the bytes beside the card
    assert {"model.pt", "model.onnx", "roc.png", "learning_curves.png", "report.html"} <= set(card.files)
    assert set(card.plots) <= set(card.files)
    for name, entry in card.files.items():
        data = storage.read_bytes(storage.join(reg, "tinynet", "v0001", name))
        assert entry.model_dump() == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert card.metrics["val"]["n"] == 120 and card.data.manifest_digest == "d" * 64
    assert registry.get_alias(reg, "tinynet", "latest") == "v0001"
    assert registry.get_alias(reg, "tinynet", "champion") == "v0001"
    assert card.warnings == []  # 120 val and test images: enough


@pytest.mark.slow  # trains and registers: in `make test`, not `make test-fast`
def test_a_small_val_or_test_split_is_warned_in_the_log_and_the_card(tmp_path, caplog):
    index_uri = _index(tmp_path, n=40)
    reg = str(tmp_path / "reg")
    with caplog.at_level(logging.WARNING):
        register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    card = registry.load_card(reg, "tinynet", "v0001")
    assert [w.split(":")[0] for w in card.warnings] == [
        "the val split has only 40 images (under 100)", "the test split has only 40 images (under 100)"]
    assert [r.getMessage() for r in caplog.records if "only 40 images" in r.getMessage()] == card.warnings


@pytest.mark.slow  # two trainings and registrations
def test_a_corrupt_champion_never_blocks_a_new_version(tmp_path, caplog):
    """Issue 12 item 8: the champion is named, skipped with a warning, and training goes on."""
    index_uri = _index(tmp_path)
    reg = str(tmp_path / "reg")
    register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    model_pt = tmp_path / "reg" / "tinynet" / "v0001" / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped byte in the tensor data
    model_pt.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        result = register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    assert result.ref.version == "v0002"
    assert "champion v0001 skipped for comparison: tinynet v0001" in caplog.text
    assert "is corrupt: expected sha256" in caplog.text
    # No intact version is left to compare with: the new one takes over.
    assert result.is_champion and registry.get_alias(reg, "tinynet", "champion") == "v0002"
    assert any("v0001" in note for note in result.promotion.notes)
    assert result.promotion.reason.startswith("no intact champion or version to compare with")
    assert registry.load_card(reg, "tinynet", "v0002").champion_comparison.notes == list(result.promotion.notes)

    # The next run compares with v0002, re-scored on this run's val split.
    third = register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    assert third.comparison.champion_version == "v0002"
    assert third.comparison.basis == "re-scored on this run's val split"


def test_a_bad_champion_metric_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="invalid champion metric"):
        register.train_evaluate_register(str(tmp_path / "index.json"), "d" * 64, CONFIG, str(tmp_path), "m", "loss", recipe="seed")
