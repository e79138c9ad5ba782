"""The shift suite: seeded features under acquisition shifts, stored with val and test, and their metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pneumo import augment, shift
from pneumo.config import SplitConfig
from pneumo.images import decode_gray
from pneumo.manifest import ImageRecord, Manifest
from pneumo.config import recipe
from pneumo.shard_files import index_uri, load_split, write_index
from pneumo.shards import plan_shards, write_shard

ROBUST = recipe("robust").transform.model_copy(update={"size": (224, 224), "renditions": 0})
SEED = recipe("seed").transform.model_copy(update={"size": (224, 224)})
SHA = hashlib.sha256(b"an image").hexdigest()


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    y, x = np.mgrid[0:224, 0:224] / 224.0
    rng = np.random.default_rng(3)
    picture = 0.3 + 0.5 * np.exp(-((x - 0.35) ** 2 + (y - 0.5) ** 2) / 0.03) + 0.4 * np.exp(-((x - 0.7) ** 2 + (y - 0.55) ** 2) / 0.02)
    return np.clip(picture + rng.normal(0, 0.02, picture.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("config", [ROBUST, SEED], ids=["robust", "seed"])
def test_the_suite_is_seeded(gray, config):
    first = shift.shift_features(gray, config, SHA)
    assert first.shape == (len(shift.SHIFTS), config.n_features) and first.dtype == np.float32
    np.testing.assert_array_equal(shift.shift_features(gray, config, SHA), first)  # same inputs, same features

    reseeded = shift.shift_features(gray, config.model_copy(update={"shift_seed": 1}), SHA)
    differs = [name for name, a, b in zip(shift.NAMES, first, reseeded) if not np.array_equal(a, b)]
    assert "noise_0.03" in differs  # the seeded parts change with the seed...
    assert "zoom_0.9" not in differs and "blur" not in differs  # ...the fixed ones do not


@pytest.mark.parametrize("config", [ROBUST, SEED], ids=["robust", "seed"])
def test_every_shift_changes_the_features_but_what_zscores_remove(gray, config):
    clean = augment.features(gray, config, augment.Rendition())
    # Per-image z-scores cancel a linear change of exposure (unless it clips): that is their point.
    invariant = {"contrast_e+0.2", "contrast_e-0.2", "brightness_+0.06", "brightness_-0.06"} if config.normalize == "zscore" else set()
    for name, row in zip(shift.NAMES, shift.shift_features(gray, config, SHA)):
        assert np.isfinite(row).all(), name
        assert np.allclose(row, clean, atol=1e-4) == (name in invariant), name


def test_shift_metrics_per_shift_worst_and_clean():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    shifted = np.array([0.1, 0.6, 0.7, 0.2, 0.65, 0.8, 0.3, 0.9])  # two normals called pneumonia, one miss
    out = shift.shift_metrics(labels, {"clean": perfect, "blur": perfect, "jpeg_q30": shifted}, 0.5)
    assert out["clean"] == {"roc_auc": 1.0, "specificity": 1.0, "sensitivity": 1.0, "accuracy": 1.0}
    assert set(out["per_shift"]) == {"blur", "jpeg_q30"}
    assert out["per_shift"]["jpeg_q30"]["specificity"] == 0.5 and out["per_shift"]["jpeg_q30"]["sensitivity"] == 0.75
    assert out["worst"]["specificity"] == (0.5, "jpeg_q30")
    assert out["worst"]["roc_auc"][1] == "jpeg_q30" and out["worst"]["roc_auc"][0] < 1.0
    with pytest.raises(ValueError, match="blur"):
        shift.shift_metrics(labels, {"blur": perfect[:3]}, 0.5)


def test_val_and_test_shards_store_the_suite_val_the_stress_val_and_train_shards_neither(tmp_path):
    root = tmp_path / "data"
    records = []
    for patient in range(12):
        label = patient % 2
        relpath = f"train/{['NORMAL', 'PNEUMONIA'][label]}/" + (f"IM-{patient:04d}-0001.jpeg" if label == 0 else f"person{patient}_virus_1.jpeg")
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(patient)
        Image.fromarray(rng.integers(0, 256, (60, 60), dtype=np.uint8)).save(root / relpath, quality=90)
        data = (root / relpath).read_bytes()
        records.append(ImageRecord(relpath=relpath, split="train", label=label, patient_id=str(patient),
                                   bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    manifest = Manifest(root=str(root), records=records)
    split = SplitConfig(min_val_images=100, val_fraction=0.3, test_fraction=0.3)
    transform = ROBUST.model_copy(update={"size": (60, 60)})
    specs = plan_shards(manifest, split, transform, 100, str(tmp_path / "shards"))
    results = [write_shard(spec) for spec in specs]
    uri = write_index(results, index_uri(str(tmp_path / "shards"), manifest.digest(), transform, split, 100),
                      manifest_digest=manifest.digest(), transform=transform, split_config=split)
    for spec in specs:
        with h5py.File(spec.uri, "r") as f:
            if spec.split == "train":
                assert "shift_features" not in f
            else:
                assert f["shift_features"].shape == (len(shift.NAMES), len(spec.records), 140)
                assert json.loads(f.attrs["shift_names"]) == list(shift.NAMES)
            # The stress val is val's alone: test stays the untouched held-out check, train never sees it.
            if spec.split == "val":
                assert f["stress_features"].shape == (len(spec.records), shift.STRESS_RENDITIONS, 140)
            else:
                assert "stress_features" not in f
    for name in ("val", "test"):
        data = load_split(uri, name)
        assert list(data.shift) == list(shift.NAMES)
        by_relpath = {r.relpath: r for r in records}
        first = by_relpath[data.relpaths[0]]
        expected = shift.shift_features(decode_gray(Path(root) / first.relpath, transform), transform, first.sha256)
        np.testing.assert_array_equal(np.stack([data.shift[n][0] for n in shift.NAMES]), expected)
        if name == "val":
            gray = decode_gray(Path(root) / first.relpath, transform)
            np.testing.assert_array_equal(data.stress[0], shift.stress_features(gray, transform, first.sha256))
            assert data.stress.shape == (len(data.labels), shift.STRESS_RENDITIONS, 140)
        else:
            assert data.stress is None
    assert load_split(uri, "train").shift == {} and load_split(uri, "train").stress is None


def test_stretches_change_one_axis_only():
    x, y = shift.stretch("x", 0.82).warp[:2], shift.stretch("y", 1.22).warp[:2]
    assert x == pytest.approx((0.82, 1.0)) and y == pytest.approx((1.0, 1.22))
    assert {"stretch_x0.82", "stretch_x1.22", "stretch_y0.82", "stretch_y1.22"} <= set(shift.NAMES)


@pytest.mark.parametrize("config", [ROBUST, SEED], ids=["robust", "seed"])
def test_the_stress_val_is_seeded_per_image_and_the_same_for_every_recipe_setting_but_the_seed(gray, config):
    first = shift.stress_features(gray, config, SHA)
    assert first.shape == (shift.STRESS_RENDITIONS, config.n_features) and np.isfinite(first).all()
    np.testing.assert_array_equal(shift.stress_features(gray, config, SHA), first)
    # Ten different jitters, none of them the clean film.
    clean = augment.features(gray, config, augment.Rendition())
    assert len({row.tobytes() for row in first}) == shift.STRESS_RENDITIONS
    assert not any(np.allclose(row, clean, atol=1e-4) for row in first)
    # The jitters do not follow the recipe's own renditions or their seed, only the shift seed.
    others = config.model_copy(update={"augment_seed": 5, "renditions": 0})
    np.testing.assert_array_equal(shift.stress_features(gray, others, SHA), first)
    assert not np.array_equal(shift.stress_features(gray, config.model_copy(update={"shift_seed": 1}), SHA), first)
    assert not np.array_equal(shift.stress_features(gray, config, hashlib.sha256(b"another").hexdigest()), first)


TRIMMED = ROBUST.model_copy(update={"trim_padding": True})


@pytest.mark.parametrize("name", ["letterbox", "pillarbox"])
def test_trimmed_padding_makes_bars_no_clue(gray, name):
    """With trim_padding, a film padded with flat bars gives the features of the film itself."""
    clean = augment.features(gray, TRIMMED, augment.Rendition())
    np.testing.assert_array_equal(augment.features(gray, ROBUST, augment.Rendition()), clean)  # nothing to trim here
    rows = dict(zip(shift.NAMES, shift.shift_features(gray, TRIMMED, SHA)))
    np.testing.assert_array_equal(rows[name], clean)
    untrimmed = dict(zip(shift.NAMES, shift.shift_features(gray, ROBUST, SHA)))
    assert not np.allclose(untrimmed[name], clean, atol=0.05)  # without it, the bars show


def test_padding_is_flat_alike_bands_at_the_borders_only(gray):
    from pneumo.transform import PADDING_MOST, padding, trim_padding

    assert padding(gray) == (0, 0, 0, 0)
    framed = np.pad(gray, ((5, 0), (0, 9)), constant_values=1.0)
    framed = np.pad(framed, ((0, 3), (2, 0)), constant_values=0.0)
    assert padding(framed) == (5, 3, 2, 9)
    np.testing.assert_array_equal(trim_padding(framed), gray)
    # Bars added around a film's own flat band: both go, as the film's band alone would.
    two = np.vstack([np.zeros((4, 224), np.float32), np.full((4, 224), 0.5, np.float32), gray])
    assert padding(two) == (8, 0, 0, 0)
    # A band that is not flat (a gradient, as the dark air above the shoulders) stays.
    ramp = np.vstack([np.tile(np.linspace(0, 0.2, 224, dtype=np.float32), (6, 1)), gray])
    assert padding(ramp) == (0, 0, 0, 0)
    # At most PADDING_MOST of a side; a picture flat all over is left whole.
    wide = np.pad(gray, ((300, 0), (0, 0)))
    assert padding(wide)[0] == int(PADDING_MOST * wide.shape[0])
    assert padding(np.full((50, 60), 0.4, np.float32)) == (0, 0, 0, 0)


def test_trimmed_padding_on_real_films_cuts_what_the_scanner_added(shared_data):
    """A real film: its own flat bands are cut; letterboxed, the same film is cut back to them."""
    from pneumo.transform import padding

    films = sorted((shared_data / "train" / "NORMAL").glob("*.jpeg"))[:60]
    grays = [decode_gray(path.read_bytes(), TRIMMED) for path in films]
    assert any(any(padding(g)) for g in grays) and not all(any(padding(g)) for g in grays)
    for g in grays[:10]:
        bars = shift._bars(0)(g, np.random.default_rng(0))
        clean = augment.features(g, TRIMMED, augment.Rendition())
        np.testing.assert_array_equal(augment.features(bars, TRIMMED, augment.Rendition()), clean)
