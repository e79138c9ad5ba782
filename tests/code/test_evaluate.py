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
    assert m["specificity"] == 0.0
    json.dumps(m)


def test_no_positive_predictions_gives_zero_precision_without_warning():
    m = metrics([0, 1], [0.1, 0.2])
    assert m["precision"] == 0.0 and m["recall"] == 0.0


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


def test_comparison_markdown_shows_both_models_and_the_decision():
    from pneumo.registry import compare

    challenger = metrics([0, 1, 1, 0], [0.2, 0.9, 0.8, 0.3])
    champion = metrics([0, 1, 1, 0], [0.6, 0.9, 0.4, 0.3])
    comparison = compare("roc_auc", challenger, "v0001", champion)
    text = comparison_markdown("tinynet", "v0002", challenger, comparison, champion, is_champion=True)
    assert "| champion | v0001 |" in text and "| challenger | v0002 |" in text
    assert "**roc_auc**" in text and "v0002 is now champion" in text
    assert f"{champion['roc_auc']:.4f}" in text and f"{challenger['roc_auc']:.4f}" in text
