"""Test-time views (pneumo.views): one scoring for the card and for every user path (issue 24)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pneumo import predict, register, registry, shard_files, shards, views
from pneumo.config import SplitConfig, ViewConfig, recipe
from pneumo.download import build_manifest
from pneumo.manifest import save_manifest
from pneumo.model import predict_proba
from tests.helpers import run_pneumo

N_FILMS = 50


def test_a_film_always_gets_the_same_views_and_the_mean_over_them():
    config = ViewConfig(count=16)
    first, again = views.draw_views(config, "ab" * 32), views.draw_views(config, "ab" * 32)
    assert first == again and first != views.draw_views(config, "cd" * 32)
    assert views.draw_views(config.model_copy(update={"count": 4}), "ab" * 32) == first[:4]  # view n is view n
    for view in first:  # the mild ranges: geometry only
        assert 0.92 <= view.zoom <= 1.09 and abs(view.translate_x) <= 0.04 and abs(view.rotation) <= 4.0
        assert abs(view.aspect) <= 0.1 and (view.gamma, view.contrast, view.brightness, view.blur) == (1.0, 1.0, 0.0, 0.0)
    rows, extra = np.zeros((2, 3)), np.ones((2, 4, 3))
    probability = lambda x: x[:, 0] * 0.5 + 0.25  # noqa: E731: 0.25 for the film, 0.75 for each view
    np.testing.assert_allclose(views.film_scores(probability, rows, extra), [(0.25 + 4 * 0.75) / 5] * 2)
    np.testing.assert_allclose(views.film_scores(probability, rows, None), [0.25, 0.25])
    np.testing.assert_allclose(views.film_scores(probability, rows, extra[:, :0]), [0.25, 0.25])


@pytest.fixture(scope="module")
def registered(subset_source, tmp_path_factory):
    """A robust4 version (2 renditions and 3 epochs, to stay quick: the views are the recipe's) registered
    from real films; its card's scores of its val and test films, by path."""
    work = tmp_path_factory.mktemp("views")
    manifest = build_manifest(subset_source)
    manifest_uri = save_manifest(manifest, str(work / "manifests"))
    transform = recipe("robust4").transform.model_copy(update={"size": (224, 224), "renditions": 2})
    index = shards.run(manifest_uri, str(subset_source), SplitConfig(), transform, 1000, str(work), workers=2)
    config = recipe("robust4").train.model_copy(update={"epochs": 3, "swa_start": 2})
    reg = str(work / "registry")
    result = register.train_evaluate_register(index.uri, manifest.digest(), config, reg, "tinynet", recipe="robust4")
    card_scores = {}
    for split in ("val", "test"):
        relpaths = shard_files.load_split(index.uri, split).relpaths
        card_scores.update({str(subset_source / r): float(p) for r, p in zip(relpaths, result.evaluation.predictions[split][1])})
    films = sorted(card_scores)[:N_FILMS]
    return reg, result, {film: card_scores[film] for film in films}, index.uri


@pytest.mark.slow  # a version trained and registered on 500 real films
def test_the_card_is_scored_with_views_and_says_so(registered):
    reg, result, _, index_uri = registered
    card = registry.load_card(reg, "tinynet", result.ref.version)
    assert card.config.transform.views.count == 16 and card.as_json()["views"]["count"] == 16
    val = shard_files.load_split(index_uri, "val")
    assert val.views.shape[1:] == (16, 140) and val.stress_views.shape[1:] == (10, 16, 140)
    single = predict_proba(registry.load_state_dict(reg, "tinynet", result.ref.version), val.features)
    assert not np.allclose(result.evaluation.predictions["val"][1], single)  # the views do change the scores
    stress = card.metrics["stress_val"]
    assert stress["n"] == 10 * card.metrics["val"]["n"]


@pytest.mark.slow  # a version trained and registered on 500 real films
def test_every_score_a_user_gets_equals_the_cards_on_50_films(registered, tmp_path):
    """pneumo predict (torch and model.onnx), the CLI, serve and the batch flow's scoring, against the card."""
    reg, result, card_scores, _ = registered
    films = list(card_scores)
    want = np.array([card_scores[film] for film in films])
    on_torch = predict.Predictor.from_registry(reg, runtime="torch")
    np.testing.assert_allclose([p.probability for p in on_torch.predict(films)], want, rtol=0, atol=1e-6)
    on_onnx = predict.Predictor.from_registry(reg)
    assert on_onnx.runtime == "onnxruntime"
    np.testing.assert_allclose([p.probability for p in on_onnx.predict(films)], want, rtol=0, atol=1e-5)

    cli = run_pneumo("predict", *films, "--registry", reg, "--json")
    assert cli.returncode == 0, cli.stderr
    printed = [json.loads(line) for line in cli.stdout.splitlines()]
    np.testing.assert_allclose([p["probability"] for p in printed], want, rtol=0, atol=1e-5)
    assert all(p["distance"] is not None for p in printed)

    from fastapi.testclient import TestClient

    from pneumo import serve

    with TestClient(serve.create_app(reg, "tinynet", "champion")) as client:
        answer = client.post("/predict/batch", files=[("files", (f"{i}.jpeg", open(f, "rb").read(), "image/jpeg"))
                                                       for i, f in enumerate(films)])
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose([p["probability"] for p in answer.json()], want, rtol=0, atol=1e-5)

    rows = predict.score_inputs(reg, "tinynet", result.ref.version,
                                [predict.InputImage(relpath=f"{i}.jpeg", path=f) for i, f in enumerate(films)])
    table = list(csv.DictReader(io.StringIO(predict.predictions_csv(rows).decode())))
    np.testing.assert_allclose([float(r["probability"]) for r in table], want, rtol=0, atol=2e-6)
    assert all(float(r["distance"]) >= 0 for r in table)


@pytest.mark.slow  # a version trained and registered on 500 real films
def test_views_0_gives_the_single_pass_score(registered):
    reg, result, card_scores, _ = registered
    films = list(card_scores)[:5]
    weights = registry.load_state_dict(reg, "tinynet", result.ref.version)
    single = predict.Predictor.from_registry(reg, runtime="torch", views=0)
    rows = np.stack([single.features(open(f, "rb").read())[0] for f in films])
    got = [p.probability for p in single.predict(films)]
    np.testing.assert_allclose(got, predict_proba(weights, rows), rtol=0, atol=1e-6)
    assert not np.allclose(got, [card_scores[f] for f in films], atol=1e-4)
    cli = run_pneumo("predict", films[0], "--registry", reg, "--json", "--views", "0")
    assert json.loads(cli.stdout)["probability"] == pytest.approx(got[0], abs=1e-5)


@pytest.mark.slow  # a version trained and registered on 500 real films
def test_the_card_scores_the_shift_suite_with_the_films_views(registered, subset_source):
    """The card's shift-suite figures are each shifted film's score with its 16 views (issue 24), made at
    evaluation from the films' bytes the val and test shards keep: the same as scoring every shifted film's
    views from the source file, and not the single-pass figures."""
    from pneumo import shift
    from pneumo.images import decode_gray

    reg, result, _, index_uri = registered
    root = subset_source
    card = registry.load_card(reg, "tinynet", result.ref.version).as_json()
    assert "shift" in card["views"]["scored_with_views"] and "single_pass" not in card["views"]
    weights = registry.load_state_dict(reg, "tinynet", result.ref.version)
    transform = registry.load_card(reg, "tinynet", result.ref.version).config.transform
    assert transform.views.count == 16
    for split in ("val", "test"):
        data = shard_files.load_split(index_uri, split)
        assert len(data.films) == len(data.labels) and data.shift
        source = [(Path(root) / relpath).read_bytes() for relpath in data.relpaths]
        assert data.films == source  # the film's own bytes
        viewed = np.stack([views.shifted_view_features(decode_gray(film, transform), transform, hashlib.sha256(film).hexdigest())
                           for film in source])
        probs = {name: views.film_scores(lambda rows: predict_proba(weights, rows), data.shift[name], viewed[:, i])
                 for i, name in enumerate(shift.NAMES)}
        single = {name: predict_proba(weights, data.shift[name]) for name in shift.NAMES}
        threshold = card["threshold"]
        want = shift.shift_metrics(data.labels, probs, threshold)["per_shift"]
        one_pass = shift.shift_metrics(data.labels, single, threshold)["per_shift"]
        got = card["metrics"]["shift"][split]["per_shift"]
        for name in shift.NAMES:
            for metric in ("roc_auc", "accuracy", "specificity", "sensitivity"):
                assert got[name][metric] == pytest.approx(want[name][metric], abs=1e-9), (split, name, metric)
        assert any(got[name]["roc_auc"] != one_pass[name]["roc_auc"] or got[name]["accuracy"] != one_pass[name]["accuracy"]
                   for name in shift.NAMES)


@pytest.mark.slow  # 500 real films copied
def test_a_shifted_films_views_are_made_as_prediction_makes_a_view(subset_source):
    """Each shifted film's view row is the canvas of the view's warp composed with the shift's geometry, with
    the shift's exposure change as shift_features applies it, pooled; the exposure shifts' views start from
    the plain film's view canvases (resampled once): the same rows as making each on its own."""
    from pneumo import augment, shift
    from pneumo.images import decode_gray
    from pneumo.transform import Resampler, pool_features

    transform = recipe("robust4").transform.model_copy(update={"size": (224, 224)})
    film = next(iter(sorted(subset_source.rglob("*.jpeg")))).read_bytes()
    sha256 = hashlib.sha256(film).hexdigest()
    gray = decode_gray(film, transform)
    got = views.shifted_view_features(gray, transform, sha256)
    assert got.shape == (len(shift.SHIFTS), 16, 140)
    key = views.picture_key(Resampler(gray, transform))  # the film's views are drawn by its picture, as prediction draws them
    drawn = views.draw_views(transform.views, key)
    for number, chosen in enumerate(shift.SHIFTS):
        pixels = gray
        if chosen.pixels is not None:
            pixels = chosen.pixels(gray, np.random.default_rng([transform.shift_seed, int(sha256[:32], 16), number]))
        picture = Resampler(pixels, transform)
        for at, view in enumerate(drawn):
            canvas = augment.photometric(picture.canvas(views.composed(chosen.rendition, view).warp), chosen.rendition)
            np.testing.assert_allclose(got[number, at], pool_features(canvas, transform), rtol=0, atol=1e-6, err_msg=chosen.name)
    # the plain film's views are prediction's own view rows
    plain = views.view_features(Resampler(gray, transform), transform, key)
    gamma = shift.NAMES.index("gamma_e+0.35")
    assert not np.allclose(got[gamma], plain)  # the exposure change is applied


def test_a_films_view_warps_are_drawn_at_once_with_the_same_numbers():
    """view_warps (the K views' warps from the generator's draws at once, for prediction) are draw_views'
    warps bit for bit: the view rows of versions registered before it are the rows prediction makes now."""
    for views_config in (ViewConfig(count=16), ViewConfig(count=8, aspect=0.0), ViewConfig(count=32, seed=3, zoom=(0.8, 1.2))):
        for number in range(500):
            sha256 = hashlib.sha256(str(number).encode()).hexdigest()
            assert views.view_warps(views_config, sha256) == [view.warp for view in views.draw_views(views_config, sha256)]
