"""pneumo.predict: a registered version scores images with its card's transform and threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pneumo import registry
from pneumo.predict import CardError, ModelNotFound, Predictor, list_inputs
from tests.helpers import late_exif_png
from tests.predict_helpers import TRANSFORM, card, expected_probability, image_bytes, register_two, state_dict, xray_pair


@pytest.fixture
def two_versions(tmp_path):
    root = str(tmp_path / "registry")
    return root, register_two(root)


def test_alias_and_version_select_the_model_and_its_threshold(two_versions, shared_data):
    root, weights = two_versions
    normal, pneumonia = xray_pair(shared_data)
    champion = Predictor.from_registry(root)  # alias champion by default
    assert (champion.version, champion.threshold) == ("v0001", 0.5)
    latest = Predictor.from_registry(root, alias="latest")
    pinned = Predictor.from_registry(root, version="v0002")
    assert latest.version == pinned.version == "v0002" and pinned.threshold == 0.3
    for predictor in (champion, pinned):
        results = predictor.predict([normal, pneumonia])
        for path, result in zip((normal, pneumonia), results):
            expected = expected_probability(weights[predictor.version], path)
            assert result.probability == pytest.approx(expected, abs=1e-6)
            assert result.label == ("PNEUMONIA" if expected >= predictor.threshold else "NORMAL")
            assert result.threshold == predictor.threshold
            assert result.model == {"name": "tinynet", "version": predictor.version}
            assert result.warnings == [] and result.error is None
    # Two different models: the selection really changes what is scored.
    assert champion.predict([normal])[0].probability != pinned.predict([normal])[0].probability


def test_every_constant_comes_from_the_card_not_the_defaults(tmp_path, shared_data):
    """The issue's trap: featurize's default config (1000 x 1300) silently gave other features."""
    root = str(tmp_path / "registry")
    weights = state_dict(3)
    registry.register(root, "tinynet", weights, card(weights))
    registry.set_alias(root, "tinynet", "champion", "v0001")
    predictor = Predictor.from_registry(root)
    assert predictor.config == TRANSFORM and predictor.config.size == (224, 224)


def test_bytes_and_paths_give_the_same_prediction(two_versions, shared_data):
    root, _ = two_versions
    normal, _ = xray_pair(shared_data)
    predictor = Predictor.from_registry(root)
    by_path, by_bytes, named = predictor.predict([normal, normal.read_bytes(), ("upload.jpeg", normal.read_bytes())])
    assert by_path.probability == by_bytes.probability == named.probability
    assert named.input == "upload.jpeg"


def test_missing_registry_version_or_alias_is_a_clear_error(two_versions, tmp_path):
    root, _ = two_versions
    with pytest.raises(ModelNotFound, match="registry .*nowhere does not exist"):
        Predictor.from_registry(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFound, match=r"no version 'v0009' of tinynet .*versions: v0001, v0002"):
        Predictor.from_registry(root, version="v0009")
    with pytest.raises(ModelNotFound, match=r"no alias 'staging' .*versions: v0001, v0002"):
        Predictor.from_registry(root, alias="staging")
    with pytest.raises(ModelNotFound, match="holds no version of 'other'"):
        Predictor.from_registry(root, model_name="other")


def test_a_non_image_among_images_gets_its_own_error(two_versions, shared_data, tmp_path):
    root, _ = two_versions
    normal, pneumonia = xray_pair(shared_data)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an x-ray")
    results = Predictor.from_registry(root).predict([normal, notes, tmp_path / "missing.jpeg", pneumonia])
    assert [r.ok for r in results] == [True, False, False, True]
    assert "not an image" in results[1].error and results[1].probability is None and results[1].label is None
    assert results[2].error == "no such file"
    assert all(r.probability is not None for r in (results[0], results[3]))


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_a_seed_model_scores_a_png_whose_exif_follows_the_pixels(two_versions, shared_data, tmp_path, orientation):
    """Issue 23, item 10: turned films (tall, then wide) scored as their upright copies, the good film beside them too."""
    root, weights = two_versions
    normal, pneumonia = xray_pair(shared_data)
    film = Image.open(pneumonia).convert("L")
    paths = []
    for shape, size in (("tall", (180, 260)), ("wide", (260, 180))):
        upright = film.resize(size)
        upright.save(tmp_path / f"{shape}-upright.png")
        paths.append(tmp_path / f"{shape}-turned.png")
        paths[-1].write_bytes(late_exif_png(upright, orientation))
    results = Predictor.from_registry(root).predict([*paths, normal])
    assert [r.error for r in results] == [None, None, None]
    for path, result in zip(paths, results):
        upright = path.with_name(path.name.replace("turned", "upright"))
        assert result.probability == pytest.approx(expected_probability(weights["v0001"], upright), abs=1e-6)
    assert results[2].probability == pytest.approx(expected_probability(weights["v0001"], normal), abs=1e-6)


def test_an_older_card_is_refused_naming_the_missing_fields(tmp_path):
    root = str(tmp_path / "registry")
    weights = state_dict(1)
    old = card(weights)
    for key in ("schema_version", "threshold", "labels", "files", "confusion_matrix_layout"):
        old.pop(key)  # what today's pipeline writes: config.train.threshold, no schema_version
    registry.register(root, "tinynet", weights, old)
    registry.set_alias(root, "tinynet", "champion", "v0001")
    with pytest.raises(CardError, match=r"tinynet v0001 .*lacks schema_version, threshold .*older card"):
        Predictor.from_registry(root)

    no_transform = card(weights)
    del no_transform["config"]["transform"]
    registry.register(root, "tinynet", weights, no_transform)
    with pytest.raises(CardError, match=r"lacks config.transform"):
        Predictor.from_registry(root, version="v0002")


def test_weights_that_do_not_match_the_card_are_refused(tmp_path):
    root = str(tmp_path / "registry")
    weights = state_dict(1)
    registry.register(root, "tinynet", weights, card(weights))
    registry.register(root, "tinynet", state_dict(2), card(state_dict(2)))
    v1, v2 = (tmp_path / "registry" / "tinynet" / v / "model.pt" for v in ("v0001", "v0002"))
    v1.write_bytes(v2.read_bytes())  # v0001's weights swapped after registration
    with pytest.raises(CardError, match="does not match the sha256"):
        Predictor.from_registry(root, version="v0001")


def test_out_of_distribution_images_are_scored_with_a_warning_saying_why(two_versions, shared_data):
    root, _ = two_versions
    rng = np.random.default_rng(0)
    gray = lambda h, w: rng.integers(0, 256, size=(h, w), dtype=np.uint8)  # noqa: E731
    colour = np.zeros((224, 224, 3), dtype=np.uint8)
    colour[..., 0] = gray(224, 224)  # red noise: X-rays are gray
    inputs = {
        "tiny": image_bytes(gray(30, 30)),
        "aspect": image_bytes(gray(100, 600)),
        "colour": image_bytes(colour, "JPEG"),
        "blank": image_bytes(np.full((224, 224), 128, dtype=np.uint8)),
        "xray": xray_pair(shared_data)[0].read_bytes(),
    }
    results = Predictor.from_registry(root).predict(list(inputs.items()))
    by_name = {r.input: r for r in results}
    assert all(r.ok and r.probability is not None for r in results)
    assert by_name["xray"].warnings == []
    for name, words in (("tiny", "tiny"), ("aspect", "extreme aspect ratio"), ("colour", "strong colour"), ("blank", "nearly blank")):
        assert any(w.startswith(words) for w in by_name[name].warnings), (name, by_name[name].warnings)


@pytest.mark.parametrize("recipe", ["seed", "robust"])
def test_features_are_featurize_s_for_every_recipe_and_blank_is_seen_through_zscores(tmp_path, shared_data, recipe):
    """The robust recipe z-scores each film; its features must still be featurize's, bit for bit,
    and a blank film must still be called blank."""
    from pneumo.config import recipe as named
    from pneumo.transform import featurize

    transform = named(recipe).transform.model_copy(update={"size": (224, 224)})
    root = str(tmp_path / "registry")
    weights = state_dict(1) if transform.n_features == 140 else None
    registry.register(root, "tinynet", weights, card(weights, transform=transform))
    predictor = Predictor.from_registry(root, version="v0001")
    assert predictor.config.renditions == 0 and predictor.config == transform.model_copy(update={"renditions": 0})
    for path in xray_pair(shared_data):
        features, warnings = predictor.features(path.read_bytes())
        assert np.array_equal(features, featurize(path, predictor.config)) and warnings == []
    rng = np.random.default_rng(0)
    almost_blank = np.clip(128 + rng.normal(0, 1, size=(224, 224)), 0, 255).astype(np.uint8)
    (result,) = predictor.predict([image_bytes(almost_blank)])
    assert result.ok and any(w.startswith("nearly blank") for w in result.warnings), result.warnings


def test_s3_registry(s3_bucket, tmp_path, shared_data):
    root = f"s3://{s3_bucket}/registry"
    weights = register_two(root)
    normal, _ = xray_pair(shared_data)
    predictor = Predictor.from_registry(root, version="v0002")
    assert predictor.predict([normal])[0].probability == pytest.approx(expected_probability(weights["v0002"], normal), abs=1e-6)
    with pytest.raises(ModelNotFound, match="no alias 'staging'"):
        Predictor.from_registry(root, alias="staging")


def test_list_inputs_labels_from_class_folders_and_keeps_non_images(tmp_path):
    (tmp_path / "a" / "NORMAL").mkdir(parents=True)
    (tmp_path / "a" / "PNEUMONIA").mkdir(parents=True)
    for relpath in ("a/NORMAL/1.jpeg", "a/PNEUMONIA/2.jpeg", "flat.png", "notes.txt", ".DS_Store"):
        (tmp_path / relpath).write_bytes(b"x")
    listed = {i.relpath: i.label for i in list_inputs(tmp_path)}
    assert listed == {"a/NORMAL/1.jpeg": 0, "a/PNEUMONIA/2.jpeg": 1, "flat.png": None, "notes.txt": None}


def test_summary_is_json(two_versions):
    root, _ = two_versions
    summary = Predictor.from_registry(root).summary()
    assert json.loads(json.dumps(summary))["version"] == "v0001" and summary["threshold"] == 0.5
    assert summary["metrics"]["val"]["roc_auc"] == 0.9 and summary["transform"]["size"] == [224, 224]
