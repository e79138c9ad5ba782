"""The drift check against a reference: quiet on films of the same law, loud on moved ones, and honest when it cannot say."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo import drift, reference


def _films(n: int, draw: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Correlated rows of one fixed law (as features are); ``scale`` and ``shift`` move it."""
    law = np.random.default_rng(0)
    mixing, offset = law.normal(size=(140, 140)) / 12, law.normal(size=140)
    rows = np.random.default_rng([7, draw]).normal(size=(n, 140)) * scale + shift
    return (rows @ mixing + offset).astype(np.float32)


def _scores(n: int, draw: int, share: float = 0.7) -> np.ndarray:
    """Scores of a model that separates the classes, ``share`` of the films PNEUMONIA."""
    rng = np.random.default_rng([11, draw])
    sick = rng.random(n) < share
    return np.where(sick, rng.beta(8, 2, n), rng.beta(2, 8, n))


@pytest.fixture(scope="module")
def ref() -> reference.Reference:
    return reference.build(_films(3000, 0), _scores(600, 1), val_features=_films(600, 1))


def test_the_reference_holds_the_val_films_yardstick_and_stays_small(ref):
    assert ref.n_rows == 3000 and ref.n_val == 600
    films = _films(3000, 0)
    # The quantiles as stored, within the uint8 packing's step.
    span = films.max(axis=0) - films.min(axis=0)
    assert np.all(np.abs(np.asarray(ref.feature_quantiles)[10] - np.median(films, axis=0)) < span / 255 + 1e-3)
    assert len(ref.to_json()) < 50_000 and reference.Reference.from_json(ref.to_json()) == ref
    # Held-out films lie further out than the training rows: their distances, not the training rows', are the yardstick.
    assert ref.distance_quantiles[10] > np.median(reference.distances(ref, films))
    assert 0 <= ref.ood_share < 0.02 and len(ref.distance_quantiles) == 21


def test_films_of_the_same_law_raise_no_drift(ref):
    verdicts = [drift.check(ref, _films(n, 100 + n), _scores(n, 100 + n)).verdict for n in (100, 200, 500)]
    assert verdicts.count("drift") == 0 and verdicts.count("none") >= 2


def test_a_moved_mean_a_shrunk_spread_or_another_case_mix_raise_drift(ref):
    moved = drift.check(ref, _films(200, 2, shift=0.35), _scores(200, 2))
    assert moved.verdict == "drift" and {"features", "joint"} & set(moved.fired)
    assert moved.features_drifted > 0 and moved.top_features[0].p_adjusted < drift.DRIFT_ALPHA
    shrunk = drift.check(ref, _films(200, 3, scale=0.75), _scores(200, 3))
    assert shrunk.verdict == "drift"
    mix = drift.check(ref, _films(200, 4), _scores(200, 4, share=0.35))
    assert mix.verdict == "drift" and mix.fired == ["scores"]
    far = drift.check(ref, _films(200, 5) + np.where(np.arange(200) < 30, 6.0, 0.0)[:, None], _scores(200, 5))
    assert "ood" in far.fired and far.ood_share >= 0.14


def test_the_check_is_deterministic_and_reads_as_the_command_prints_it(ref):
    batch, scores = _films(150, 6, shift=0.4), _scores(150, 6)
    first, again = drift.check(ref, batch, scores), drift.check(ref, batch, scores)
    assert first == again
    lines = first.lines()
    assert lines[0] == "verdict: drift" and lines[1].startswith("films: 150")
    assert any(line.startswith("joint") and "fired" in line for line in lines)
    assert "feature_ks" not in drift.event_payload(first) and drift.event_payload(first)["verdict"] == "drift"


def test_below_the_minimum_there_is_no_verdict_and_bad_rows_are_refused(ref):
    small = drift.check(ref, _films(drift.MIN_FILMS - 1, 7), _scores(drift.MIN_FILMS - 1, 7))
    assert small.verdict == "too few films" and small.lines() == [
        "verdict: too few films", f"{drift.MIN_FILMS - 1} film(s): a verdict needs at least {drift.MIN_FILMS}"]
    with pytest.raises(ValueError, match="140 features"):
        drift.check(ref, np.zeros((200, 70)))


def test_a_reference_without_the_val_figures_skips_what_it_cannot_test(ref):
    older = ref.model_copy(update={"n_val": None, "distance_quantiles": None, "ood_share": None, "score_quantiles": None})
    report = drift.check(older, _films(200, 8), _scores(200, 8))
    assert [name for name, p in report.p_values.items() if p is not None] == ["features", "joint"]
    assert report.verdict == "none"


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # Ranked: 0.01 x 4/1, 0.03 x 4/2, 0.04 x 4/3, 0.5 x 4/4, then each the smallest of itself and those above it.
    np.testing.assert_allclose(drift.benjamini_hochberg(p), [0.04, 0.16 / 3, 0.16 / 3, 0.5])


def test_ks_distance_against_quantiles_is_the_usual_one():
    from scipy.stats import kstest, norm

    values = np.random.default_rng(0).normal(0.3, 1, 400)
    quantiles = norm.ppf(np.linspace(0.0005, 0.9995, 2001))
    ours = drift.ks_distance(values, quantiles, np.linspace(0.0005, 0.9995, 2001))
    assert abs(ours - kstest(values, "norm").statistic) < 2e-3


def test_a_reference_that_cannot_be_read_stops_neither_scoring_nor_training(tmp_path):
    from pneumo import registry
    from tests.predict_helpers import card, state_dict

    weights = state_dict(1)
    registry.register(str(tmp_path), "tinynet", weights, card(weights), extra_files={"reference.json": b'{"n_rows": "many"}'})
    outcome = drift.check_version(str(tmp_path), "tinynet", "v0001", _films(120, 9))
    assert outcome.report is None and outcome.verdict is None
    assert outcome.message.startswith("no drift check: ") and "reference.json" in outcome.message
    assert outcome.record() == {"against": "tinynet v0001", "verdict": None, "message": outcome.message}


def _borders(n: int, draw: int, rows: float = 0.2, columns: float = 0.05) -> np.ndarray:
    """Each film's trimmed share of rows and columns: ``rows`` of the films with a band above or below, ``columns`` at a side."""
    rng = np.random.default_rng([13, draw])
    out = np.zeros((n, 2), np.float32)
    out[:, 0] = np.where(rng.random(n) < rows, rng.uniform(0.01, 0.1, n), 0.0)
    out[:, 1] = np.where(rng.random(n) < columns, rng.uniform(0.01, 0.1, n), 0.0)
    return out


@pytest.fixture(scope="module")
def barred_ref() -> reference.Reference:
    return reference.build(_films(3000, 0), _scores(600, 1), val_features=_films(600, 1), train_borders=_borders(3000, 0))


def _family_kept(report: drift.DriftReport) -> bool:
    """Whether the verdict's tests are those under their share of DRIFT_ALPHA once every test run is counted
    (weighted Bonferroni: the border test 5 % of the level, the others an equal share of the rest)."""
    run = {name: p for name, p in report.p_values.items() if p is not None}
    share = {name: 0.05 if name == "borders" else (0.95 if "borders" in run else 1.0) / (len(run) - ("borders" in run))
             for name in run}
    return report.fired == [name for name, p in run.items() if p < share[name] * drift.DRIFT_ALPHA]


def test_the_family_shares_the_level_out_whole():
    """Bonferroni's guarantee needs the shares of the level (1 / factor) to add up to 1, the border test's included."""
    for tests in (list(drift.TESTS), [t for t in drift.TESTS if t != "scores"], ["features", "joint"], ["borders"]):
        factors = drift.bonferroni_factors(tests)
        assert set(factors) == set(tests) and sum(1 / f for f in factors.values()) == pytest.approx(1.0)
    assert drift.bonferroni_factors(["features", "joint"]) == {"features": 2.0, "joint": 2.0}
    factors = drift.bonferroni_factors(list(drift.TESTS))
    assert factors["borders"] == pytest.approx(20.0) and factors["joint"] == pytest.approx(5 / 0.95)


def test_bars_the_features_cannot_see_raise_drift_through_the_trimmed_padding(barred_ref):
    n = 200
    films, scores = _films(n, 21), _scores(n, 21)  # the films themselves: under trim_padding a barred film's features
    same = drift.check(barred_ref, films, scores, borders=_borders(n, 21))
    assert same.verdict == "none" and same.p_values["borders"] > 0.05 and same.not_run == {}
    assert len([p for p in same.p_values.values() if p is not None]) == 6  # the border test counts in the family
    letterbox, pillarbox, stopped = _borders(n, 22), _borders(n, 23), np.zeros((n, 2))
    letterbox[:, 0] += np.random.default_rng(1).uniform(0.11, 0.17, n)  # bars of 6-10 % above and below every film
    pillarbox[:, 1] += np.random.default_rng(2).uniform(0.11, 0.17, n)
    for borders, axis in ((letterbox, 0), (pillarbox, 1), (stopped, None)):  # stopped: a site whose films have no bands
        report = drift.check(barred_ref, films, scores, borders=borders)
        assert report.verdict == "drift" and report.fired == ["borders"] and _family_kept(report)
        if axis is not None:
            assert report.border_shares[axis] == 1.0
    assert _family_kept(same)
    lines = drift.check(barred_ref, films, scores, borders=letterbox).lines()
    assert any(line.startswith("borders") and "fired" in line for line in lines)
    assert "padding trimmed: rows of 100.0%, columns of " in "\n".join(lines) and "(training films: 20.1%, 5.8%)" in "\n".join(lines)
    with pytest.raises(ValueError, match="one pair of shares per film"):
        drift.check(barred_ref, films, scores, borders=letterbox[:, :1])


def test_a_reference_without_border_figures_says_the_border_test_was_not_run(ref, barred_ref):
    films, scores, borders = _films(200, 24), _scores(200, 24), _borders(200, 24)
    older = drift.check(ref, films, scores, borders=borders)  # a reference built before the border test
    assert older.p_values["borders"] is None and "reference has no padding figures" in older.not_run["borders"]
    assert "borders   p = n/a  (not run: the reference has no padding figures" in "\n".join(older.lines())
    assert len([p for p in older.p_values.values() if p is not None]) == 5 and _family_kept(older)
    unknown = drift.check(barred_ref, films, scores)
    assert unknown.p_values["borders"] is None and unknown.not_run == {"borders": "the films' padding figures were not given"}
    assert drift.event_payload(older)["not_run"] == older.not_run


def test_prediction_reads_the_trimmed_padding_of_each_film_it_scores():
    from pneumo.config import recipe
    from pneumo.predict import Predictor
    from tests.predict_helpers import card, state_dict

    transform = recipe("robust3").transform.model_copy(update={"size": (224, 224), "renditions": 0})
    weights = state_dict(1)
    predictor = Predictor(weights, card(weights, transform=transform), model_name="tinynet", version="v0001")
    y, x = np.mgrid[0:200, 0:200] / 200.0
    film = (np.clip(0.3 + 0.4 * np.sin(9 * x) * np.cos(7 * y) + 0.2 * x, 0, 1) * 255).astype(np.uint8)

    def png(pixels: np.ndarray) -> bytes:
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()

    boxed = np.pad(film, ((25, 25), (0, 0)))  # 50 of 250 rows
    results, features, borders = predictor.predict_with_features([png(film), png(boxed), b"not an image"])
    assert [r.ok for r in results] == [True, True, False] and features.shape == (2, 140) and borders.shape == (2, 2)
    np.testing.assert_allclose(borders, [[0, 0], [0.2, 0]], atol=0.01)
    np.testing.assert_array_equal(features[0], features[1])  # the features cannot tell them apart
