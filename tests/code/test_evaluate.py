import json

import pytest

from pneumo.evaluate import comparison_markdown, markdown_table, metrics, rows

# 4 NORMAL, 6 PNEUMONIA. At threshold 0.5: tn=3 fp=1 fn=2 tp=4.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
Y_PROB = [0.1, 0.2, 0.3, 0.7, 0.4, 0.45, 0.6, 0.8, 0.9, 0.95]


def test_metrics_from_the_confusion_matrix():
    m = metrics(Y_TRUE, Y_PROB)
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    # 24 (positive, negative) pairs; pairs ranked wrongly: 0.7 beats 0.4, 0.45, 0.6.
    assert m["roc_auc"] == pytest.approx(21 / 24)


def test_threshold_moves_predictions_not_auc():
    low = metrics(Y_TRUE, Y_PROB, threshold=0.25)
    assert low["confusion_matrix"] == [[2, 2], [0, 6]]
    assert low["roc_auc"] == metrics(Y_TRUE, Y_PROB)["roc_auc"]


def test_metrics_are_json_serializable():
    m = metrics(Y_TRUE, Y_PROB)
    assert json.loads(json.dumps(m)) == m
    assert all(type(m[k]) is float for k in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"))


def test_single_class_split_has_no_auc():
    m = metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert m["roc_auc"] is None
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]
    assert m["specificity"] is None  # no NORMAL film: undefined, not 0
    json.dumps(m)


def test_no_positive_predictions_gives_no_precision_without_warning():
    m = metrics([0, 1], [0.1, 0.2])
    assert m["precision"] is None and m["recall"] == 0.0


def test_a_set_without_pneumonia_has_no_recall():
    """Issue 15 item 13: a labelled set of NORMAL films only reported recall 0.000; it has none."""
    m = metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert m["recall"] is None and m["specificity"] == 2 / 3 and m["precision"] == 0.0


@pytest.mark.parametrize("y_true, y_prob", [([0, 1], [0.5]), ([], []), ([0, 2], [0.1, 0.9])])
def test_bad_input_is_refused(y_true, y_prob):
    with pytest.raises(ValueError):
        metrics(y_true, y_prob)


def test_rows_and_markdown_have_one_line_per_split():
    by_split = {"val": metrics(Y_TRUE, Y_PROB), "test": metrics([1, 1], [0.9, 0.2])}
    table = rows(by_split)
    assert [r["split"] for r in table] == ["val", "test"]
    assert (table[0]["tn"], table[0]["fp"], table[0]["fn"], table[0]["tp"]) == (3, 1, 2, 4)
    text = markdown_table(by_split)
    lines = text.strip().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| val | 10 | 70.00 |")
    assert "n/a" in lines[3]  # test has no AUC
    # The shift suite's metrics (one dict per split and shift) are not a row of this table.
    assert rows({**by_split, "shift": {"val": {"clean": {}}}}) == table


def _card_of(state_dict, evaluation, fields: dict) -> dict:
    from pneumo import registry

    return registry.build_card(
        state_dict=state_dict, metrics=evaluation.metrics, training={}, config={}, manifest_digest="d" * 64,
        shards_digest="s" * 64, counts={}, **fields,
    )


def test_threshold_labels_and_layout_have_one_writer_each():
    """The evaluation writes the threshold it scored with; the registry the labels and the matrix layout."""
    import torch

    from pneumo.model import TinyNet

    torch.manual_seed(0)
    state_dict = TinyNet(n_features=140).state_dict()
    rng = np.random.default_rng(0)
    splits = {s: Split(rng.random((40, 140), dtype=np.float32), rng.integers(0, 2, 40), list(range(40))) for s in ("val", "test")}
    evaluation = evaluate_model(state_dict, splits, 0.3, n_boot=20)
    from_evaluation = set(evaluation.card_fields())
    from_registry = set(_card_of(state_dict, evaluation, {}))
    for field in ("threshold", "labels", "confusion_matrix_layout"):
        assert (field in from_evaluation) != (field in from_registry), field
    with pytest.raises(ValueError, match="labels would be written twice"):
        _card_of(state_dict, evaluation, {"labels": {"0": "A", "1": "B"}})


def test_comparison_markdown_shows_both_models_and_the_decision():
    from pneumo.promotion import compare

    challenger = metrics([0, 1, 1, 0], [0.2, 0.9, 0.8, 0.3])
    champion = metrics([0, 1, 1, 0], [0.6, 0.9, 0.4, 0.3])
    comparison = compare("roc_auc", challenger, "v0001", champion)
    text = comparison_markdown("tinynet", "v0002", challenger, comparison.to_json(), champion, is_champion=True)
    assert "| champion | v0001 |" in text and "| challenger | v0002 |" in text
    assert "**roc_auc**" in text and "v0002 is now champion" in text
    assert f"{champion['roc_auc']:.4f}" in text and f"{challenger['roc_auc']:.4f}" in text


# --- Bootstrap confidence intervals by patient ---------------------------------------------


import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from pneumo.evaluate import (  # noqa: E402
    CI_METRICS,
    _resampled_metrics,
    bootstrap_ci,
    ci_markdown_table,
    evaluate_model,
    metrics_with_ci,
)


def held_back_like(n_patients: int, rows_per_patient: int = 1, seed: int = 0, patient_effect: float = 0.0):
    """Labels, probabilities and patient ids shaped like the held-back split: 37.5% NORMAL, AUC ~0.9.

    ``patient_effect`` shifts all of a patient's scores together (correlated rows).
    """
    rng = np.random.default_rng(seed)
    patient_label = (rng.random(n_patients) >= 0.375).astype(int)
    effect = rng.normal(0, patient_effect, n_patients)
    patients = np.repeat(np.arange(n_patients), rows_per_patient)
    y = patient_label[patients]
    logit = np.where(y == 1, 1.2, -0.8) + effect[patients] + rng.normal(0, 1.0, len(y))
    return y, 1 / (1 + np.exp(-logit)), patients


def test_resampled_metrics_match_sklearn_with_weights():
    """The vectorized per-resample figures equal sklearn's with the resample's multiplicities as weights."""
    y, p, patients = held_back_like(60, rows_per_patient=2, seed=3)
    p = np.round(p, 1)  # many ties: they must count half, as in sklearn
    rng = np.random.default_rng(1)
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=5).astype(float)
    out = _resampled_metrics(y, p, patients, weights, 0.5)
    for b in range(5):
        w = weights[b][patients]
        expected = metrics(np.repeat(y, w.astype(int)), np.repeat(p, w.astype(int)), 0.5)
        for name in CI_METRICS:
            assert out[name][b] == pytest.approx(expected[name]), name
        assert out["roc_auc"][b] == pytest.approx(roc_auc_score(y, p, sample_weight=w))


def test_intervals_contain_the_point_estimate():
    y, p, patients = held_back_like(624)
    m = metrics_with_ci(y, p, patients, 0.5)
    for name in CI_METRICS:
        low, high = m["ci95"][name]
        assert low <= m[name] <= high, name
        assert high - low > 0, name


def test_intervals_shrink_with_the_square_root_of_n():
    y, p, patients = held_back_like(600, seed=1)
    y4, p4, patients4 = held_back_like(2400, seed=1)
    for name in ("accuracy", "specificity", "roc_auc"):
        small, large = bootstrap_ci(y, p, patients)[name], bootstrap_ci(y4, p4, patients4)[name]
        ratio = (large[1] - large[0]) / (small[1] - small[0])
        assert 0.35 < ratio < 0.65, (name, ratio)  # 4x the patients: about half the width


def test_patient_resampling_is_wider_than_row_resampling_for_correlated_rows():
    y, p, patients = held_back_like(150, rows_per_patient=4, patient_effect=2.0, seed=2)
    by_patient = bootstrap_ci(y, p, patients)
    by_row = bootstrap_ci(y, p, None)
    for name in ("accuracy", "roc_auc"):
        patient_width = by_patient[name][1] - by_patient[name][0]
        row_width = by_row[name][1] - by_row[name][0]
        assert patient_width > 1.3 * row_width, (name, patient_width, row_width)


def test_bootstrap_is_seeded():
    y, p, patients = held_back_like(200)
    assert bootstrap_ci(y, p, patients, seed=7) == bootstrap_ci(y, p, patients, seed=7)
    assert bootstrap_ci(y, p, patients, seed=7) != bootstrap_ci(y, p, patients, seed=8)


def test_resamples_where_a_metric_is_undefined_are_skipped_not_counted_as_zero():
    # 3 patients: one NORMAL with 10 images, two PNEUMONIA, all predicted correctly. About 30%
    # of resamples hold no PNEUMONIA patient: recall is undefined there, not 0.
    y = [0] * 10 + [1, 1]
    p = [0.1] * 10 + [0.9, 0.8]
    ci = bootstrap_ci(y, p, ["a"] * 10 + ["b", "c"])
    assert ci["recall"] == [1.0, 1.0] and ci["precision"] == [1.0, 1.0] and ci["specificity"] == [1.0, 1.0]


def test_single_class_split_has_no_auc_interval():
    ci = bootstrap_ci([1, 1, 1, 1], [0.2, 0.6, 0.9, 0.7], ["a", "a", "b", "c"])
    assert ci["roc_auc"] is None
    assert ci["recall"][0] <= 0.5 <= ci["recall"][1]


def test_metrics_with_ci_are_json_serializable_and_rendered():
    y, p, patients = held_back_like(100)
    m = metrics_with_ci(y, p, [f"person{i}" for i in patients], 0.5, n_boot=200)
    assert json.loads(json.dumps(m)) == m
    table = ci_markdown_table({"val": m})
    low, high = m["ci95"]["accuracy"]
    assert f"{100 * m['accuracy']:.2f} ({100 * low:.1f}-{100 * high:.1f})" in table


class Split:
    """The parts of a ShardData that evaluation reads."""

    def __init__(self, features, labels, patient_ids, shift=None):
        self.features, self.labels, self.patient_ids = features, labels, patient_ids
        if shift is not None:
            self.shift = shift


def test_evaluate_model_records_ci_threshold_labels_and_no_shift_without_shift_data():
    import torch

    from pneumo.model import TinyNet

    torch.manual_seed(0)
    state_dict = TinyNet(n_features=140).state_dict()
    rng = np.random.default_rng(0)
    splits = {s: Split(rng.random((40, 140), dtype=np.float32), rng.integers(0, 2, 40), list(range(40))) for s in ("val", "test")}
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_auc": 0.6}]
    evaluation = evaluate_model(state_dict, splits, 0.4, history, best_epoch=1, n_boot=100)
    fields = evaluation.card_fields(plots=["roc.png"])
    assert fields["threshold"] == 0.4 and fields["plots"] == ["roc.png"]
    card = _card_of(state_dict, evaluation, fields)  # the labels are the registry's to write
    assert card["threshold"] == 0.4 and card["plots"] == ["roc.png"]
    assert card["labels"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert card["confusion_matrix_layout"].startswith("[[tn, fp], [fn, tp]]")
    assert set(evaluation.metrics) == {"val", "test"}  # no shift data, no shift section
    assert evaluation.metrics["val"]["threshold"] == 0.4
    assert set(evaluation.metrics["val"]["ci95"]) == set(CI_METRICS)
    assert evaluation.history == history
    json.dumps({**fields, "metrics": evaluation.metrics})


def test_evaluate_model_scores_every_shift_with_the_clean_reference(monkeypatch):
    """Each shift's features are scored as if alone (one batched pass must not mix them up), and
    pneumo.shift.shift_metrics gets them with the clean scores under "clean"."""
    import sys
    import types

    import torch

    from pneumo.model import TinyNet
    from pneumo.model import predict_proba

    received = {}

    def shift_metrics(labels, probs_by_shift, threshold):  # stands in for pneumo.shift's (another branch)
        received.update(probs_by_shift)
        return {"per_shift": {n: {"roc_auc": 0.5} for n in probs_by_shift if n != "clean"}, "clean": {}, "worst": {}}

    monkeypatch.setitem(sys.modules, "pneumo.shift", types.SimpleNamespace(shift_metrics=shift_metrics))
    torch.manual_seed(0)
    state_dict = TinyNet(n_features=140).state_dict()
    rng = np.random.default_rng(0)
    shifted = {name: rng.random((30, 140), dtype=np.float32) for name in ("blur", "jpeg", "zoom")}
    val = Split(rng.random((30, 140), dtype=np.float32), rng.integers(0, 2, 30), list(range(30)), shift=shifted)
    test = Split(rng.random((20, 140), dtype=np.float32), rng.integers(0, 2, 20), list(range(20)))  # no shift data
    evaluation = evaluate_model(state_dict, {"val": val, "test": test}, 0.5, n_boot=50)
    assert set(evaluation.metrics["shift"]) == {"val"}
    assert set(received) == {"clean", "blur", "jpeg", "zoom"}
    np.testing.assert_allclose(received["clean"], predict_proba(state_dict, val.features), rtol=1e-6)
    for name, X in shifted.items():
        np.testing.assert_allclose(received[name], predict_proba(state_dict, X), rtol=1e-6, atol=1e-7)


def test_youden_threshold_maximizes_sensitivity_plus_specificity():
    from pneumo.evaluate import youden_threshold

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.6).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    t = youden_threshold(y, p)

    def j(threshold):
        m = metrics(y, p, threshold)
        return m["recall"] + m["specificity"] - 1

    assert 0 < t < 1 and j(t) >= max(j(c) for c in np.linspace(0.01, 0.99, 99)) - 1e-12
    with pytest.raises(ValueError, match="NORMAL and PNEUMONIA"):
        youden_threshold(np.ones(5), np.linspace(0, 1, 5))


class _Val:
    """The parts of a val ShardData that the stress val uses."""

    def __init__(self, labels, patient_ids, stress):
        self.labels, self.patient_ids, self.stress = np.asarray(labels), list(patient_ids), stress


def _stress_case():
    import torch

    from pneumo.model import TinyNet

    torch.manual_seed(0)
    model = TinyNet(n_features=6).eval()
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 20)
    stress = rng.normal(0, 1, (40, 4, 6)).astype(np.float32) + labels[:, None, None] * 0.8
    return model.state_dict(), _Val(labels, [f"p{i // 2}" for i in range(40)], stress)


def test_the_stress_val_repeats_each_images_label_and_patient_for_its_jitters():
    from pneumo.evaluate import stress_predictions

    state_dict, val = _stress_case()
    labels, probs, patients = stress_predictions(state_dict, val)
    assert len(labels) == len(probs) == len(patients) == 160
    assert labels[:4].tolist() == [0] * 4 and labels[4:8].tolist() == [1] * 4 and patients[:8].tolist() == ["p0"] * 8


def test_the_decision_threshold_follows_the_rule():
    from pneumo.evaluate import decision_threshold, stress_predictions, youden_threshold

    state_dict, val = _stress_case()
    assert decision_threshold(state_dict, val, "fixed", 0.5) == 0.5
    labels, probs, _ = stress_predictions(state_dict, val)
    assert decision_threshold(state_dict, val, "stress_youden", 0.5) == youden_threshold(labels, probs)
    val.stress = None
    with pytest.raises(ValueError, match="stress val"):
        decision_threshold(state_dict, val, "stress_youden", 0.5)


def test_evaluate_model_scores_the_stress_val_with_patient_cis():
    from pneumo.evaluate import evaluate_model, stress_predictions

    state_dict, val = _stress_case()
    val.features, val.shift = val.stress[:, 0], {}
    out = evaluate_model(state_dict, {"val": val}, 0.4, threshold_rule="stress_youden", n_boot=200)
    stress = out.metrics["stress_val"]
    labels, probs, _ = stress_predictions(state_dict, val)
    assert stress["n"] == 160 and stress["jitters_per_image"] == 4 and stress["threshold"] == 0.4
    assert stress["roc_auc"] == metrics(labels, probs)["roc_auc"]
    assert stress["ci95"]["roc_auc"][0] <= stress["roc_auc"] <= stress["ci95"]["roc_auc"][1]
    assert out.card_fields()["threshold_rule"] == "stress_youden"
    val.stress = None
    assert "stress_val" not in evaluate_model(state_dict, {"val": val}, 0.4, n_boot=50).metrics
