"""Classification metrics of a split, and their rendering as tables for reports."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from sklearn import metrics as skm

# Column order of the report tables.
COLUMNS = ("n", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def metrics(y_true, y_prob, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of binary predictions, as plain JSON-serializable Python values.

    A probability at or above ``threshold`` predicts PNEUMONIA (1). ``roc_auc`` is None
    when ``y_true`` holds a single class (AUC is undefined then). ``confusion_matrix``
    is [[tn, fp], [fn, tp]].
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    y_prob = np.asarray(y_prob, dtype=float).ravel()
    if len(y_true) != len(y_prob):
        raise ValueError(f"y_true has {len(y_true)} values but y_prob has {len(y_prob)}; they must match")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics of an empty split")
    if not set(np.unique(y_true)) <= {0, 1}:
        raise ValueError(f"labels must be 0 (NORMAL) or 1 (PNEUMONIA), got {sorted(set(np.unique(y_true)))}")
    y_pred = (y_prob >= threshold).astype(int)

    (tn, fp), (fn, tp) = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    roc_auc = None
    if len(np.unique(y_true)) == 2:
        roc_auc = float(skm.roc_auc_score(y_true, y_prob))
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": roc_auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def rows(metrics_by_split: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per split (confusion matrix spelled out as tn/fp/fn/tp), for a table artifact."""
    out = []
    for split, m in metrics_by_split.items():
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        out.append({"split": split, **{k: m[k] for k in COLUMNS}, "tn": tn, "fp": fp, "fn": fn, "tp": tp})
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.2f}"
    return str(value)


def markdown_table(metrics_by_split: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per split; rates are shown in percent."""
    table = rows(metrics_by_split)
    header = ["split", *COLUMNS, "tn", "fp", "fn", "tp"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
    ]
    for row in table:
        lines.append("| " + " | ".join(_cell(row[key]) for key in header) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(
    model_name: str,
    version: str,
    challenger_val: dict[str, Any],
    comparison: dict[str, Any],
    champion_val: Optional[dict[str, Any]],
    is_champion: bool,
) -> str:
    """Champion against challenger on every val metric, the deciding one in bold, then the decision."""
    metric = comparison["metric"]
    names = [m for m in COLUMNS if m != "n"]
    header = ["role", "version", *[f"**{m}**" if m == metric else m for m in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("challenger", version, challenger_val)]
    if comparison["champion_version"] is not None:
        rows.insert(0, ("champion", comparison["champion_version"], champion_val or {}))
    for role, row_version, values in rows:
        cells = ["n/a" if values.get(m) is None else f"{values[m]:.4f}" for m in names]
        lines.append("| " + " | ".join([role, row_version, *cells]) + " |")
    outcome = f"**{version} is now champion.**" if is_champion else f"**{version} is not promoted.**"
    basis = f" Champion figures: {comparison['basis']}." if comparison["basis"] else ""
    return (
        f"# {model_name}: champion against challenger\n\n"
        + "\n".join(lines)
        + f"\n\n{outcome} Rule: val {metric}, strictly greater wins; {comparison['reason']}.{basis}\n"
    )
