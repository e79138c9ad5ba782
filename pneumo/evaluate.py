"""Classification metrics of a split, and their rendering as tables for reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from pneumo import markdown as md


# scikit-learn and the model (torch) are imported where they are used: a run that trains and
# scores nothing (a cached re-run, the CLI's summary) then starts without them (seconds).

# Column order of the report tables.
COLUMNS = ("n", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def metrics(y_true, y_prob, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of binary predictions, as plain JSON-serializable Python values.

    A probability at or above ``threshold`` predicts PNEUMONIA (1). ``roc_auc`` is None
    when ``y_true`` holds a single class (AUC is undefined then); so are ``recall`` without
    positives, ``specificity`` without negatives and ``precision`` without positive predictions. ``confusion_matrix``
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
    from sklearn import metrics as skm

    (tn, fp), (fn, tp) = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    roc_auc = None
    if len(np.unique(y_true)) == 2:
        roc_auc = float(skm.roc_auc_score(y_true, y_prob))
    # None where a rate has no denominator (recall of a set without PNEUMONIA films, ...): it is
    # undefined there, not 0, as in bootstrap_ci.
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "roc_auc": roc_auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def rows(metrics_by_split: dict[str, dict[str, Any]], digits: Optional[int] = None) -> list[dict[str, Any]]:
    """One flat row per split (confusion matrix spelled out as tn/fp/fn/tp), for a table artifact.

    With ``digits`` the metrics are text of that many decimals: a float column shows 16 and is cut in the UI.
    """
    out = []
    for split, m in metrics_by_split.items():
        if "confusion_matrix" not in m:
            continue  # "shift": per-shift metrics, reported in their own table
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        shown = {k: m[k] if k == "n" or digits is None else format_metric(m[k], digits) for k in COLUMNS}
        out.append({"split": split, **shown, "tn": tn, "fp": fp, "fn": fn, "tp": tp})
    return out


def format_metric(value: Optional[float], digits: int = 3) -> str:
    """A metric as a person reads it: ``digits`` decimals, ``n/a`` when it is undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


SMALL_SPLIT = 100  # fewer val or test images than this: AUC and accuracy swing by several points per image


def small_split_warnings(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """One warning per val or test split under SMALL_SPLIT images: its figures are too uncertain to trust."""
    warnings = []
    for split in ("val", "test"):
        n = (metrics.get(split) or {}).get("n")
        if n is not None and n < SMALL_SPLIT:
            warnings.append(
                f"the {split} split has only {n} images (under {SMALL_SPLIT}): its metrics are too uncertain "
                "to trust (see their CIs); use a larger source"
            )
    return warnings


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
    """Champion against challenger on every val metric (and the stress-val AUC), the deciding one in bold,
    then the decision."""
    metric = comparison["metric"]
    names = [m for m in COLUMNS if m != "n"] + ["stress_roc_auc"]
    header = ["role", "version", *[f"**{m}**" if m == metric else m for m in names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [("challenger", version, challenger_val)]
    if comparison["champion_version"] is not None:
        rows.insert(0, ("champion", comparison["champion_version"], champion_val or {}))
    for role, row_version, values in rows:
        cells = [format_metric(values.get(m), 4) for m in names]
        lines.append("| " + " | ".join([role, row_version, *cells]) + " |")
    outcome = f"**{version} is now champion.**" if is_champion else f"**{version} is not promoted.**"
    basis = f" Champion figures: {md.text(comparison['basis'])}." if comparison["basis"] else ""
    return (
        f"# {model_name}: champion against challenger\n\n"
        + "\n".join(lines)
        + f"\n\n{outcome} Rule: {comparison.get('decided_by', 'val ' + metric)}, strictly greater wins; "
        f"{md.text(comparison['reason'])}.{basis}\n"
    )


# --- Confidence intervals -----------------------------------------------------------------

CI_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def youden_threshold(y_true, y_prob) -> float:
    """The threshold that maximizes Youden's J = sensitivity + specificity - 1 (ties: the first, highest).

    Chosen on the stress val, where no class mix or exposure is taken for granted: it weighs a
    missed pneumonia and a false alarm alike, as balanced training does.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    if len(np.unique(y_true)) != 2:
        raise ValueError("Youden's threshold needs NORMAL and PNEUMONIA rows")
    from sklearn import metrics as skm  # here: a cached run imports no scikit-learn

    fpr, tpr, thresholds = skm.roc_curve(y_true, np.asarray(y_prob, dtype=float).ravel())
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6))  # roc_curve's first threshold is +inf


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0: a resample without positives has no recall, not a recall of 0."""
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _resampled_metrics(y_true, y_prob, patient, weights, threshold) -> dict[str, np.ndarray]:
    """Each metric under each resample; ``weights[b, p]`` = copies of patient ``p`` in resample ``b``.

    The confusion counts are one matrix product; the AUC is a weighted Mann-Whitney statistic
    over the rows sorted once: for each positive, the negative weight scored below it (ties
    count half), over (positive weight) x (negative weight). NaN where a metric is undefined in a
    resample (AUC with one class, recall without positives, precision without positive predictions).
    """
    n_boot, n_patients = weights.shape
    y_pred = (y_prob >= threshold).astype(int)
    cells = np.zeros((n_patients, 4))  # per patient: tn, fp, fn, tp
    np.add.at(cells, (patient, 2 * y_true + y_pred), 1)
    tn, fp, fn, tp = (weights @ cells).T
    out = {
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    order = np.argsort(y_prob, kind="stable")
    scores, is_pos, row_patient = y_prob[order], y_true[order] == 1, patient[order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # groups of tied scores
    row_w = weights[:, row_patient]
    pos = np.add.reduceat(row_w * is_pos, starts, axis=1)
    neg = np.add.reduceat(row_w * ~is_pos, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    both = (n_pos > 0) & (n_neg > 0)
    auc = np.full(n_boot, np.nan)
    auc[both] = (pos[both] * (below[both] + 0.5 * neg[both])).sum(axis=1) / (n_pos[both] * n_neg[both])
    out["roc_auc"] = auc
    return out


def bootstrap_ci(
    y_true,
    y_prob,
    patient_ids=None,
    threshold: float = 0.5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[Optional[float]]]:
    """Percentile bootstrap intervals {metric: [low, high]}, resampling patients with replacement.

    A patient's images are correlated, so they are drawn together: resampling rows would
    pretend each image is independent evidence and give too narrow intervals. Without
    ``patient_ids`` every row is its own patient. Resamples where a metric is undefined are
    skipped for it (ROC AUC with a single class, recall without positives, ...), rather than
    counted as 0; an interval is None when no resample could compute it.

    Vectorized: a resample is a vector of patient multiplicities (see ``_resampled_metrics``),
    so 1000 resamples of 700 rows take a few tens of milliseconds.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    y_prob = np.asarray(y_prob, dtype=float).ravel()
    n = len(y_true)
    if len(y_prob) != n or n == 0:
        raise ValueError(f"need as many probabilities as labels, and at least one: got {n} and {len(y_prob)}")
    if patient_ids is None:
        patient_ids = np.arange(n)
    patient_ids = np.asarray(patient_ids)
    if len(patient_ids) != n:
        raise ValueError(f"got {len(patient_ids)} patient ids for {n} rows")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _, patient = np.unique(patient_ids, return_inverse=True)
    patient = patient.ravel()
    n_patients = patient.max() + 1

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    # weights[b, p]: how many times resample b drew patient p.
    offsets = (np.arange(n_boot) * n_patients)[:, None]
    weights = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients)
    out = _resampled_metrics(y_true, y_prob, patient, weights.astype(float), threshold)

    tail = 100 * (1 - level) / 2
    intervals = {}
    for name in CI_METRICS:
        values = out[name][~np.isnan(out[name])]
        if len(values) == 0:
            intervals[name] = None
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[name] = [float(low), float(high)]
    return intervals


def metrics_with_ci(y_true, y_prob, patient_ids=None, threshold: float = 0.5, **bootstrap) -> dict[str, Any]:
    """``metrics`` plus ``ci95``: 95% intervals resampled by patient (see ``bootstrap_ci``)."""
    return {
        **metrics(y_true, y_prob, threshold),
        "ci95": bootstrap_ci(y_true, y_prob, patient_ids, threshold, level=0.95, **bootstrap),
    }


# --- What a registered version records about its quality -----------------------------------


@dataclass
class Evaluation:
    """A trained model scored on val and test: the card's quality fields and the pictures' inputs."""

    threshold: float
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (labels, probabilities)
    metrics: dict[str, dict[str, Any]]  # "val", "test": metrics_with_ci; "shift" and "stress_val" when the shards have them
    history: list[dict[str, Any]]  # per epoch: epoch, train_loss, val_loss, val_auc
    best_epoch: Optional[int] = None
    threshold_rule: str = "fixed"  # how the threshold was chosen (TrainConfig.threshold_rule)
    views: int = 0  # test-time views per film the val, test, stress-val (and shift-suite) figures were scored with
    single_pass: tuple[str, ...] = ()  # what was scored without them ("shift": shards of older code, no films' bytes)

    def card_fields(self, plots: list[str] = ()) -> dict[str, Any]:
        """The card fields the evaluation alone writes: the threshold it scored with, its rule, the pictures,
        the views. ``metrics`` (pass ``self.metrics``) and ``training.history`` are placed by the caller; labels by the registry."""
        with_views = [name for name in ("val", "test", "stress_val", "threshold", "shift") if name not in self.single_pass]
        single = {"single_pass": list(self.single_pass)} if self.single_pass else {}
        scored = {"views": {"count": self.views, "scored_with_views": with_views, **single}} if self.views else {}
        return {"threshold": self.threshold, "threshold_rule": self.threshold_rule, "plots": list(plots), **scored}


def evaluate_model(
    state_dict,
    splits: dict[str, Any],
    threshold: float,
    history: list[dict[str, Any]] = (),
    *,
    best_epoch: Optional[int] = None,
    threshold_rule: str = "fixed",
    n_boot: int = 1000,
    seed: int = 0,
    transform=None,
) -> Evaluation:
    """Score a model on ``splits`` ({"val": ShardData, "test": ShardData}): metrics with patient CIs,
    the shift suite when the splits carry shifted features (``ShardData.shift``), and the stress
    val (``metrics["stress_val"]``, CIs by patient) when val carries it (``ShardData.stress``).

    Val, test and the stress val are scored with the test-time views the shards hold
    (``pneumo.views.film_scores``), as every prediction of the model is; the shift suite too, its views
    made here from the films' bytes the shards keep (``pneumo.views.shift_scores``, with ``transform``,
    the shards' TransformConfig). Without those bytes (shards of older code) the shift suite is scored in
    one pass and ``Evaluation.single_pass`` says so."""
    from pneumo.model import predict_proba
    from pneumo.views import film_scores, shift_scores

    predictions, scored = {}, {}
    for split, data in splits.items():
        y = np.asarray(data.labels).astype(int)
        p = film_scores(lambda rows: predict_proba(state_dict, rows), data.features, getattr(data, "views", None))
        predictions[split] = (y, p)
        scored[split] = metrics_with_ci(y, p, data.patient_ids, threshold, n_boot=n_boot, seed=seed)
    shift, single_pass = {}, ()
    for split, data in splits.items():
        shifted = getattr(data, "shift", None)
        if shifted:
            from pneumo.shift import shift_metrics

            if getattr(data, "views", None) is not None and getattr(data, "films", None) is not None and transform is not None:
                probs = shift_scores(lambda rows: predict_proba(state_dict, rows), shifted, data.films, transform)
            else:
                single_pass = ("shift",) if getattr(data, "views", None) is not None else ()
                # One forward pass over every shift: twenty small ones cost ten times more.
                names = list(shifted)
                flat = predict_proba(state_dict, np.concatenate([shifted[name] for name in names]))
                probs = dict(zip(names, np.split(flat, len(names))))
            shift[split] = shift_metrics(predictions[split][0], {"clean": predictions[split][1], **probs}, threshold)
    if shift:
        scored["shift"] = shift
    if "val" in splits and getattr(splits["val"], "stress", None) is not None:
        labels, probs, patients = stress_predictions(state_dict, splits["val"])
        scored["stress_val"] = {
            **metrics_with_ci(labels, probs, patients, threshold, n_boot=n_boot, seed=seed),
            "jitters_per_image": int(splits["val"].stress.shape[1]),
        }
    views = next((data.views.shape[1] for data in splits.values() if getattr(data, "views", None) is not None), 0)
    return Evaluation(float(threshold), predictions, scored, [dict(h) for h in history], best_epoch, threshold_rule, views,
                      single_pass)


def stress_predictions(state_dict, val) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, patient ids) of every stress row of ``val`` (a ShardData with ``stress``),
    each jittered film scored with its views when ``val`` holds them (``stress_views``): each image's
    jitters carry its label and patient, so the CIs resample patients as for clean val."""
    from pneumo.model import predict_proba
    from pneumo.views import film_scores

    n, jitters, n_features = val.stress.shape
    stress_views = getattr(val, "stress_views", None)
    if stress_views is not None:
        stress_views = stress_views.reshape(n * jitters, stress_views.shape[2], n_features)
    probs = film_scores(lambda rows: predict_proba(state_dict, rows), val.stress.reshape(n * jitters, n_features), stress_views)
    return np.repeat(np.asarray(val.labels).astype(int), jitters), probs, np.repeat(np.asarray(val.patient_ids), jitters)


def decision_threshold(state_dict, val, rule: str, fixed: float) -> float:
    """The threshold a model is used at: ``fixed``, or Youden's J on the stress val of ``val``."""
    if rule == "fixed":
        return float(fixed)
    if rule != "stress_youden":
        raise ValueError(f"unknown threshold rule {rule!r}")
    if getattr(val, "stress", None) is None:
        raise ValueError("threshold rule 'stress_youden' needs the stress val in the val shards: turn the shift suite on")
    labels, probs, _ = stress_predictions(state_dict, val)
    return youden_threshold(labels, probs)


def ci_markdown_table(metrics_by_split: dict[str, dict[str, Any]]) -> str:
    """Markdown table of every metric with its 95% interval, in percent: "95.5 (93.8-97.1)"."""
    header = ["split", "n", *CI_METRICS]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for split, m in metrics_by_split.items():
        cells = [split, str(m["n"])]
        for name in CI_METRICS:
            interval = (m.get("ci95") or {}).get(name)
            cell = _cell(m[name])
            if interval is not None:
                cell += f" ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
