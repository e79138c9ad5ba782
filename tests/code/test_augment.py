"""Augmented renditions: deterministic per (image, rendition, seed), train only, inside the patient's split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pneumo import augment
from pneumo.config import AugmentConfig, SplitConfig, TransformConfig, seed_transform
from pneumo.images import decode_gray
from pneumo.manifest import ImageRecord, Manifest
from pneumo.shard_files import index_uri, load_split, write_index
from pneumo.shards import plan_shards, write_shard
from pneumo.transform import Resampler, featurize

AUGMENT = AugmentConfig(zoom=(0.9, 1.12), shift=0.05, rotation=5.0, gamma=0.35, contrast=0.2, brightness=0.06, aspect=0.0, blur=0.0)
TRANSFORM = seed_transform(
    size=(64, 64), method="resample", grid=(7, 10), pooling=("max", "mean"), normalize="zscore",
    crop_fraction=0.02, cell_pixels=4, augment=AUGMENT, renditions=3, shift_suite=False,
)
SPLIT_CONFIG = SplitConfig(min_val_images=100, val_fraction=0.3, test_fraction=0.3)


def _film(rng: np.random.Generator) -> np.ndarray:
    """A smooth picture with structure (two bright blobs), so geometric changes move features."""
    y, x = np.mgrid[0:80, 0:96] / 80.0
    centres = rng.uniform(0.2, 0.8, size=(2, 2))
    picture = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02) for cx, cy in centres)
    return np.clip(40 + 180 * picture + rng.normal(0, 4, picture.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def manifest(tmp_path) -> Manifest:
    """30 images of 15 patients (two each), all in the source's train split: val and test are carved by patient."""
    root = tmp_path / "data"
    records = []
    for patient in range(15):
        label = patient % 2
        for image in range(2):
            name = f"IM-{patient:04d}-{image:04d}.jpeg" if label == 0 else f"person{patient}_bacteria_{image}.jpeg"
            relpath = f"train/{['NORMAL', 'PNEUMONIA'][label]}/{name}"
            path = root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_film(np.random.default_rng(patient * 10 + image))).save(path, quality=90)
            data = path.read_bytes()
            records.append(ImageRecord(relpath=relpath, split="train", label=label, patient_id=str(patient),
                                       bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return Manifest(root=str(root), records=records)


def _write_all(manifest: Manifest, out_dir: Path, transform: TransformConfig = TRANSFORM) -> str:
    specs = plan_shards(manifest, SPLIT_CONFIG, transform, 7, str(out_dir))
    results = [write_shard(spec) for spec in specs]
    uri = index_uri(str(out_dir), manifest.digest(), transform, SPLIT_CONFIG, 7)
    return write_index(results, uri, manifest_digest=manifest.digest(), transform=transform, split_config=SPLIT_CONFIG)


def test_train_rows_are_each_image_then_its_renditions_and_val_test_are_never_augmented(manifest, tmp_path):
    uri = _write_all(manifest, tmp_path / "shards")
    train = load_split(uri, "train")
    k = TRANSFORM.renditions
    n_images = len(train.labels) // (k + 1)
    assert n_images > 0 and len(train.labels) == n_images * (k + 1)
    assert train.renditions.tolist() == list(range(k + 1)) * n_images
    root = Path(manifest.root)
    for at in range(0, len(train.labels), k + 1):
        group = slice(at, at + k + 1)
        assert len(set(train.relpaths[group])) == 1 and len(set(train.patient_ids[group])) == 1
        assert len(set(train.labels[group].tolist())) == 1
        # The original row is exactly what featurize gives (and so what prediction computes).
        np.testing.assert_array_equal(train.features[at], featurize(root / train.relpaths[at], TRANSFORM))
        for offset in range(1, k + 1):
            assert not np.allclose(train.features[at + offset], train.features[at])
    for split in ("val", "test"):
        data = load_split(uri, split)
        assert len(data.labels) > 0
        assert data.renditions.tolist() == [0] * len(data.labels)
        assert len(set(data.relpaths)) == len(data.relpaths)


def test_renditions_are_deterministic_and_seeded(manifest, tmp_path):
    first = load_split(_write_all(manifest, tmp_path / "a"), "train")
    again = load_split(_write_all(manifest, tmp_path / "b"), "train")
    np.testing.assert_array_equal(first.features, again.features)

    reseeded = load_split(_write_all(manifest, tmp_path / "c", TRANSFORM.model_copy(update={"augment_seed": 1})), "train")
    originals = first.renditions == 0
    np.testing.assert_array_equal(reseeded.features[originals], first.features[originals])
    assert not np.allclose(reseeded.features[~originals], first.features[~originals])


def test_a_rendition_depends_on_the_image_bytes_and_its_number_only(manifest):
    record = manifest.records[0]
    gray = decode_gray(Path(manifest.root) / record.relpath, TRANSFORM)
    rows = augment.rendition_features(gray, TRANSFORM, record.sha256, 3)
    # Fewer renditions, another call: the same first ones (nothing depends on K or on call order).
    np.testing.assert_array_equal(augment.rendition_features(gray, TRANSFORM, record.sha256, 2), rows[:3])
    other = augment.rendition_features(gray, TRANSFORM, manifest.records[1].sha256, 3)
    np.testing.assert_array_equal(other[0], rows[0])
    assert not np.allclose(other[1:], rows[1:])


def test_a_patients_renditions_never_cross_a_split(manifest, tmp_path):
    uri = _write_all(manifest, tmp_path / "shards")
    data = {split: load_split(uri, split) for split in ("train", "val", "test")}
    patients = {split: set(part.patient_ids) for split, part in data.items()}
    assert patients["train"].isdisjoint(patients["val"]) and patients["train"].isdisjoint(patients["test"])
    assert patients["val"].isdisjoint(patients["test"])
    # Every rendition row belongs to an original row of the same split.
    train = data["train"]
    originals = {(p, r) for p, r, k in zip(train.patient_ids, train.relpaths, train.renditions) if k == 0}
    assert {(p, r) for p, r in zip(train.patient_ids, train.relpaths)} == originals


def test_identity_rendition_changes_nothing_and_photometric_stays_in_range():
    rng = np.random.default_rng(0)
    gray = _film(rng).astype(np.float32) / 255
    assert augment.features(gray, TRANSFORM, augment.Rendition()).tolist() == augment.features(gray, TRANSFORM, augment.Rendition()).tolist()
    canvas = rng.uniform(0, 1, (28, 40)).astype(np.float32)
    assert augment.photometric(canvas, augment.Rendition()) is canvas
    for rendition in (augment.Rendition(gamma=0.7, contrast=1.3, brightness=0.06), augment.Rendition(brightness=-0.5)):
        out = augment.photometric(canvas, rendition)
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_draws_stay_inside_the_configured_ranges():
    for r in augment.draw(AUGMENT, augment.rendition_rng(0, "ab" * 32), 200):
        assert 0.9 <= r.zoom <= 1.12 and abs(r.translate_x) <= 0.05 and abs(r.translate_y) <= 0.05 and abs(r.rotation) <= 5
        assert np.exp(-0.35) <= r.gamma <= np.exp(0.35) and np.exp(-0.2) <= r.contrast <= np.exp(0.2)
        assert abs(r.brightness) <= 0.06


def test_shards_store_the_rendition_index(manifest, tmp_path):
    specs = plan_shards(manifest, SPLIT_CONFIG, TRANSFORM, 100, str(tmp_path / "s"))
    spec = next(s for s in specs if s.split == "train")
    result = write_shard(spec)
    with h5py.File(spec.uri, "r") as f:
        assert f["renditions"].dtype == np.uint8
        assert f["features"].shape == (len(spec.records) * 4, 140)
    assert result.count == len(spec.records) and result.rows == 4 * len(spec.records)


def test_originals_keeps_one_row_per_image(manifest, tmp_path):
    train = load_split(_write_all(manifest, tmp_path / "shards"), "train")
    originals = train.originals()
    assert originals.relpaths == train.relpaths[:: TRANSFORM.renditions + 1]
    np.testing.assert_array_equal(originals.features, train.features[train.renditions == 0])
    assert originals.renditions.tolist() == [0] * len(originals.relpaths)


WIDE = AugmentConfig(zoom=(0.85, 1.2), shift=0.08, rotation=8.0, gamma=0.5, contrast=0.3, brightness=0.08, aspect=0.2, blur=0.3)


def _bar_columns(canvas: np.ndarray) -> int:
    """How many canvas columns the bright vertical bar of ``_bar_film`` covers."""
    return int((canvas.max(axis=0) > 0.5).sum())


def _bar_film() -> np.ndarray:
    film = np.zeros((200, 200), np.float32)
    film[20:180, 80:120] = 1.0  # 40 px wide, 160 px tall, centred
    return film


def test_aspect_stretches_one_axis_against_the_other():
    picture = Resampler(_bar_film(), TRANSFORM)
    plain = picture.canvas()
    for aspect in (0.2, -0.2):
        rendition = augment.Rendition(aspect=aspect)
        zoom_x, zoom_y = rendition.warp[:2]
        assert zoom_x * zoom_y == pytest.approx(1.0) and zoom_x / zoom_y == pytest.approx(np.exp(2 * aspect))
        canvas = picture.canvas(rendition.warp)
        rows_plain, rows_now = (plain.max(axis=1) > 0.5).sum(), (canvas.max(axis=1) > 0.5).sum()
        # Wider (aspect > 0) or narrower bar, and the other way round along the height.
        assert (_bar_columns(canvas) > _bar_columns(plain)) == (aspect > 0)
        assert (rows_now < rows_plain) == (aspect > 0)


def test_recipes_without_aspect_or_blur_draw_what_they_drew_before():
    """The draw of the old layout (7 numbers per rendition), written out: the old robust recipe's renditions are unchanged."""
    rng = augment.rendition_rng(3, "cd" * 32)
    u = augment.rendition_rng(3, "cd" * 32).uniform(-1.0, 1.0, size=(4, 7))
    for i, r in enumerate(augment.draw(AUGMENT, rng, 4)):
        assert r.zoom == float(np.exp(np.log(0.9) + (u[i, 0] + 1) / 2 * (np.log(1.12) - np.log(0.9))))
        assert (r.translate_x, r.rotation, r.brightness) == (u[i, 1] * 0.05, u[i, 3] * 5.0, u[i, 6] * 0.06)
        assert r.aspect == 0.0 and r.blur == 0.0 and r.warp[0] == r.warp[1] == r.zoom


def test_wide_draws_stay_in_range_blur_about_their_share_and_do_not_depend_on_the_count():
    drawn = augment.draw(WIDE, augment.rendition_rng(0, "ef" * 32), 1000)
    assert all(abs(r.aspect) <= 0.2 and 0.85 <= r.zoom <= 1.2 and abs(r.rotation) <= 8 for r in drawn)
    blurred = [r.blur for r in drawn if r.blur]
    assert 0.25 < len(blurred) / len(drawn) < 0.35
    assert min(blurred) >= 0.005 and max(blurred) <= 0.015
    assert max(abs(r.aspect) for r in drawn) > 0.19
    assert augment.draw(WIDE, augment.rendition_rng(0, "ef" * 32), 5) == drawn[:5]


def test_blur_softens_the_canvas_and_sharp_renditions_are_untouched():
    picture = Resampler(_bar_film(), TRANSFORM)
    canvas = picture.canvas()
    assert augment.blurred(canvas, picture, augment.Rendition()) is canvas
    soft = augment.blurred(canvas, picture, augment.Rendition(blur=0.015))
    edge = np.abs(np.diff(canvas, axis=1)).max()
    assert np.abs(np.diff(soft, axis=1)).max() < 0.8 * edge
    assert soft.mean() == pytest.approx(canvas.mean(), abs=0.01)  # blur moves light, it does not add any
