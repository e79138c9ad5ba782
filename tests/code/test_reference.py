"""The training rows' reference: distances, cut-off, JSON round trip, and reference.json stored with every version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo import reference, registry, storage
from pneumo.reference import Reference

from tests.code.test_register import CONFIG, _index


def _rows(n=6000, draw=0) -> np.ndarray:
    """Correlated rows, always of the same law; ``draw`` picks which rows."""
    law = np.random.default_rng(0)
    mixing, offset = law.normal(size=(140, 140)) / 12, law.normal(size=140)
    return (np.random.default_rng([1, draw]).normal(size=(n, 140)) @ mixing + offset).astype(np.float32)


def test_distances_flag_what_lies_far_from_the_training_rows_and_the_json_is_small():
    X = _rows()
    ref = reference.build(X, val_scores=np.linspace(0, 1, 101))
    inside = reference.distances(ref, X)
    assert 0.0005 <= (inside > ref.ood_cutoff).mean() <= 0.002  # the 99.9th percentile of the training rows
    fresh = reference.distances(ref, _rows(2000, draw=1))  # the same law: as rarely flagged
    assert (fresh > ref.ood_cutoff).mean() <= 0.01
    far = reference.distances(ref, X[:50] + 3 * np.std(X, axis=0))
    assert (far > ref.ood_cutoff).all()
    # The stored (int16-packed) precision moves a distance by well under 1 % against the exact one.
    from sklearn.covariance import LedoitWolf

    exact = LedoitWolf().fit(X.astype(np.float64))
    centred = X[:500] - X.mean(axis=0)
    want = np.sqrt(((centred @ np.linalg.inv(exact.covariance_)) * centred).sum(axis=1))
    np.testing.assert_allclose(reference.distances(ref, X[:500]), want, rtol=5e-3)
    data = ref.to_json()
    assert len(data) < 50_000 and b"pickle" not in data
    again = Reference.from_json(data)
    assert again == ref and again.to_json() == data  # stable through a round trip
    assert len(ref.feature_quantiles) == 21 and len(ref.feature_quantiles[0]) == 140
    assert ref.score_quantiles[0] == 0.0 and ref.score_quantiles[-1] == 1.0 and ref.n_rows == 6000
    np.testing.assert_allclose(ref.feature_quantiles[10], np.median(X, axis=0), atol=0.05)


def test_the_arrays_are_converted_once_and_a_changed_copy_gets_its_own():
    """distances reads the precision as an array made once per reference (not from the 140 x 140 list per film),
    the same numbers as the lists'; a copy with another precision is not measured with the old one."""
    X = _rows(3000)
    ref = Reference.from_json(reference.build(X).to_json())
    mean, precision = ref.arrays()
    assert ref.arrays()[1] is precision  # converted once
    assert np.array_equal(precision, np.asarray(ref.precision)) and np.array_equal(mean, np.asarray(ref.mean))
    centred = X[:20].astype(np.float64) - np.asarray(ref.mean)
    want = np.sqrt(np.maximum(((centred @ np.asarray(ref.precision)) * centred).sum(axis=1), 0.0))
    assert np.array_equal(reference.distances(ref, X[:20]), want)  # bit for bit the list-based figure
    assert ref == Reference.from_json(ref.to_json()) and b"converted" not in ref.to_json()
    doubled = ref.model_copy(update={"precision": (4 * np.asarray(ref.precision)).tolist()})
    np.testing.assert_allclose(reference.distances(doubled, X[:20]), 2 * want, rtol=1e-12)


def test_a_reference_that_is_not_one_is_refused():
    data = json.loads(reference.build(_rows(500)).to_json())
    data["precision"]["upper_int16_base64"] = data["precision"]["upper_int16_base64"][:-8]
    with pytest.raises(ValueError, match="precision"):
        Reference.from_json(json.dumps(data).encode())
    with pytest.raises(ValueError, match="shape"):
        reference.build(np.zeros((1, 140)))


@pytest.mark.slow  # trains and registers: in `make test`, not `make test-fast`
def test_reference_json_is_stored_with_every_version_and_covered_by_the_card(tmp_path):
    from pneumo import register
    from pneumo.shard_files import load_split

    index_uri = _index(tmp_path)
    reg = str(tmp_path / "reg")
    register.train_evaluate_register(index_uri, "d" * 64, CONFIG, reg, "tinynet", recipe="seed")
    card = registry.load_card(reg, "tinynet", "v0001")
    assert reference.REFERENCE_NAME in card.files
    ref = reference.load_reference(reg, "tinynet", "v0001")
    assert ref.n_rows == len(load_split(index_uri, "train").features)
    assert card.as_json()["ood"]["cutoff"] == ref.ood_cutoff
    assert len(ref.score_quantiles) == 21
    registry.verify_version(reg, "tinynet", "v0001")  # every listed file, reference.json included
    # Changed on disk: refused, as model.pt would be.
    path = storage.join(reg, "tinynet", "v0001", reference.REFERENCE_NAME)
    stored = json.loads(storage.read_bytes(path))
    stored["ood_cutoff"] = 1e9
    storage.delete(path)
    storage.write_bytes(path, json.dumps(stored).encode())
    with pytest.raises(registry.CorruptModel, match="reference.json is corrupt"):
        reference.load_reference(reg, "tinynet", "v0001")


def test_a_version_registered_before_references_has_none(tmp_path):
    import torch

    from pneumo.model import TinyNet

    reg = str(tmp_path / "reg")
    card = {"schema_version": 2, "metrics": {"val": {}}, "threshold": 0.5}
    registry.register(reg, "tinynet", {k: v.clone() for k, v in TinyNet(140).state_dict().items()}, card)
    assert reference.load_reference(reg, "tinynet", "v0001") is None
    del torch


@pytest.mark.slow  # a reference of 3,000 rows
def test_a_plain_slope_is_flagged_though_its_distance_is_ordinary():
    """The per-image z-score makes a gradient look like a film lit unevenly: the slope check sees it."""
    rng = np.random.default_rng(0)
    rows, cols = 7, 10
    yy, xx = np.mgrid[0:rows, 0:cols]
    films = rng.normal(size=(3000, 2, rows * cols)) + 0.8 * (xx.ravel() - 4.5) / 3 * rng.normal(size=(3000, 1, 1))
    films = ((films - films.mean(axis=2, keepdims=True)) / films.std(axis=2, keepdims=True)).reshape(3000, 140)
    ref = reference.build(films, grid=(rows, cols), slope_part=1)
    again = Reference.from_json(ref.to_json())
    assert again.grid == (7, 10) and again.slope_cutoff == ref.slope_cutoff < 0.9
    ramp = np.tile(((xx - xx.mean()) / xx.std()).ravel(), 2)
    assert reference.slopes(ref, ramp)[0] == pytest.approx(1.0)
    assert reference.warning(ref, ramp).startswith("out of distribution: its brightness is a plain slope")
    assert sum(reference.warning(ref, row) is not None for row in films) <= 0.004 * len(films)


def _trimming_index(folder, n=120) -> str:
    """``_index``'s shards under a transform that trims padding: a quarter of the train films had rows trimmed, 5 % columns."""
    from pneumo import shard_files
    from pneumo.config import SplitConfig, recipe

    rng = np.random.default_rng(4)
    transform = recipe("robust3").transform.model_copy(update={"size": (224, 224), "renditions": 0})
    labels = (np.arange(n) % 2).astype(np.uint8)
    borders = np.zeros((n, 2), np.float32)
    borders[: n // 4, 0] = 0.1
    borders[n - n // 20 :, 1] = 0.05
    results = []
    for split in ("train", "val", "test"):
        spec = shard_files.ShardSpec(root=str(folder), manifest_digest="0" * 64, split_config=SplitConfig(), transform=transform,
                                     split=split, number=0, start=0, stop=n, records=(), uri=str(folder / f"{split}-0000.h5"))
        ids = [f"{split}{i}" for i in range(n)]
        features = (rng.normal(size=(n, 140)) + labels[:, None] * 0.8).astype(np.float32)
        shard_files._write_h5(folder / f"{split}-0000.h5", spec, features, labels, ids, ids, [], borders=borders)
        results.append(shard_files.ShardResult(
            uri=spec.uri, split=split, number=0, count=n, class_counts={"NORMAL": n // 2, "PNEUMONIA": n // 2},
            sha256=shard_files._sha256_file(folder / f"{split}-0000.h5")))
    return shard_files.write_index(results, str(folder / "index.json"), manifest_digest="0" * 64, transform=transform,
                                   split_config=SplitConfig())


@pytest.mark.slow  # trains and registers: in `make test`, not `make test-fast`
def test_the_training_films_trimmed_padding_is_in_the_reference_and_under_the_card(tmp_path):
    from pneumo import register

    reg = str(tmp_path / "reg")
    register.train_evaluate_register(_trimming_index(tmp_path), "d" * 64, CONFIG, reg, "tinynet", recipe="robust3")
    ref = reference.load_reference(reg, "tinynet", "v0001")
    assert ref.n_border_films == 120 and ref.border_shares == (0.25, 0.05)
    assert ref.border_quantiles[0][-1] == 0.1 and ref.border_quantiles[1][0] == 0.0 and len(ref.border_quantiles[1]) == 21
    assert len(ref.to_json()) < 50_000
    # A changed figure is refused by the card's integrity, as any change of the file is.
    path = storage.join(reg, "tinynet", "v0001", reference.REFERENCE_NAME)
    stored = json.loads(storage.read_bytes(path))
    stored["border_shares"] = [0.9, 0.9]
    storage.delete(path)
    storage.write_bytes(path, json.dumps(stored).encode())
    with pytest.raises(registry.CorruptModel, match="reference.json is corrupt"):
        reference.load_reference(reg, "tinynet", "v0001")


def test_a_reference_written_before_the_border_figures_still_loads():
    data = reference.build(_rows(500)).to_json()
    # Without border figures (a recipe that trims nothing), the file is written as before the border test.
    assert b"border" not in data
    older = Reference.from_json(data)
    assert older.border_shares is None and older.n_border_films is None and older.n_rows == 500
    with pytest.raises(ValueError, match="borders must be"):
        reference.build(_rows(500), train_borders=np.full((500, 2), 1.5))
