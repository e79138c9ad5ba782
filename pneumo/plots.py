"""Pictures of a registered version: PNG files written beside its card.

Each function draws one figure and returns its PNG bytes, so the same pictures can go to
the registry (local or S3, via ``pneumo.storage``) and into a report. Each is a matplotlib
``Figure`` of its own (not pyplot's global state), saved through Agg, and the PNGs carry no
timestamp or software tag, so the same inputs give the same bytes.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pneumo import storage
from pneumo.evaluate import format_metric
from pneumo.labels import CLASSES

SPLIT_COLORS = {"val": "tab:blue", "test": "tab:orange"}
DPI = 100

# Predictions of a split: (labels 0/1, PNEUMONIA probabilities).
Predictions = dict[str, tuple[np.ndarray, np.ndarray]]


def _subplots(*grid: int, figsize: tuple[float, float], **options: Any) -> tuple[Figure, Any]:
    """A figure of its own: not pyplot's (no global figure list, no display backend, safe on any thread)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **options)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" tag and no timestamp: same inputs, same bytes.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _legend(ax, loc: str) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing to name when no split had both classes
        ax.legend(loc=loc)


def _two_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


def roc_curves(predictions: Predictions, threshold: float) -> bytes:
    """ROC curve per split, with its AUC and the operating point at the threshold."""
    fig, ax = _subplots(figsize=(5.5, 5))
    for split, (y, p) in predictions.items():
        if not _two_classes(y):
            continue
        fpr, tpr, _ = skm.roc_curve(y, p)
        color = SPLIT_COLORS.get(split)
        ax.plot(fpr, tpr, color=color, label=f"{split} (AUC {format_metric(skm.roc_auc_score(y, p))}, n={len(y)})")
        pred = p >= threshold
        ax.plot(pred[y == 0].mean(), pred[y == 1].mean(), "o", color=color, markeredgecolor="black")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (recall)",
           title=f"ROC; dots: operating point at threshold {threshold:g}", xlim=(0, 1), ylim=(0, 1.01))
    _legend(ax, "lower right")
    return _png(fig)


def pr_curves(predictions: Predictions, threshold: float) -> bytes:
    """Precision-recall curve per split, with its average precision and the operating point."""
    fig, ax = _subplots(figsize=(5.5, 5))
    for split, (y, p) in predictions.items():
        if not _two_classes(y):
            continue
        precision, recall, _ = skm.precision_recall_curve(y, p)
        color = SPLIT_COLORS.get(split)
        ax.plot(recall, precision, color=color,
                label=f"{split} (AP {format_metric(skm.average_precision_score(y, p))}, prevalence {y.mean():.2f})")
        pred = (p >= threshold).astype(int)
        ax.plot(skm.recall_score(y, pred, zero_division=0), skm.precision_score(y, pred, zero_division=0),
                "o", color=color, markeredgecolor="black")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision",
           title=f"Precision-recall; dots: threshold {threshold:g}", xlim=(0, 1), ylim=(0, 1.01))
    _legend(ax, "lower left")
    return _png(fig)


def confusion_matrices(predictions: Predictions, threshold: float) -> bytes:
    """Confusion matrix per split: rows = truth, columns = prediction, counts and row percentages."""
    fig, axes = _subplots(1, len(predictions), figsize=(4.5 * len(predictions), 4), squeeze=False)
    for ax, (split, (y, p)) in zip(axes[0], predictions.items()):
        cm = skm.confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1])
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{cm[i, j]}\n{100 * rates[i, j]:.1f}%", ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES,
               xlabel="prediction", ylabel="truth", title=f"{split} (n={len(y)}, threshold {threshold:g})")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9, wspace=0.45)
    return _png(fig)


def score_histograms(predictions: Predictions, threshold: float) -> bytes:
    """Distribution of the PNEUMONIA probability per true class, per split, with the threshold."""
    fig, axes = _subplots(1, len(predictions), figsize=(5 * len(predictions), 3.8), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, (split, (y, p)) in zip(axes[0], predictions.items()):
        for label, color in ((0, "tab:green"), (1, "tab:red")):
            # One filled polygon per histogram: 40 bar patches each are several times slower to draw.
            ax.hist(p[y == label], bins=bins, histtype="stepfilled", alpha=0.5, color=color, label=f"{CLASSES[label]} ({(y == label).sum()})")
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set(xlabel="predicted PNEUMONIA probability", ylabel="images", title=f"{split}: scores by true class")
        ax.legend(loc="upper center")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    return _png(fig)


def reliability(predictions: Predictions, n_bins: int = 10) -> bytes:
    """Reliability diagram: observed PNEUMONIA rate against mean predicted probability, Brier score."""
    fig, ax = _subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    for split, (y, p) in predictions.items():
        if not _two_classes(y):
            continue
        observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        brier = skm.brier_score_loss(y, p)
        ax.plot(predicted, observed, "o-", color=SPLIT_COLORS.get(split), label=f"{split} (Brier {format_metric(brier)})")
    ax.set(xlabel="mean predicted probability", ylabel="fraction PNEUMONIA", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability ({n_bins} equal-width bins)")
    ax.legend(loc="upper left")
    return _png(fig)


def learning_curves(history: list[dict[str, Any]], best_epoch: Optional[int] = None) -> bytes:
    """Train and val loss, and val AUC, per epoch; the kept (best val loss) epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, auc_ax) = _subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    auc = [np.nan if h.get("val_auc") is None else h["val_auc"] for h in history]
    auc_ax.plot(epochs, auc, color="tab:purple")
    auc_ax.set(xlabel="epoch", ylabel="val ROC AUC", title="Val ROC AUC")
    for ax in (loss_ax, auc_ax):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept epoch {best_epoch}")
        _legend(ax, "upper right")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    return _png(fig)


def shift_suite(shift: dict[str, dict[str, Any]], stress: Optional[dict[str, Any]] = None) -> bytes:
    """AUC and specificity per acquisition shift, one panel per split; the clean scores as dashed lines.

    ``shift`` is ``{split: pneumo.shift.shift_metrics(...)}``: each has ``per_shift``
    ({name: {"roc_auc", "specificity", ...}}) and ``clean``. Horizontal bars, so two dozen
    shift names stay readable. ``stress`` (the stress val's metrics) is the val panel's first bar.
    """
    splits = sorted(shift, key=lambda s: (s != "val", s))  # val first, also when read from a sorted card
    names = ([STRESS_BAR] if stress else []) + list(shift[splits[0]]["per_shift"])
    bars = (("roc_auc", "ROC AUC", "tab:blue"), ("specificity", "specificity", "tab:red"))
    height = 1.5 + 0.3 * len(names)  # inches: margins + one row per shift
    fig, axes = _subplots(1, len(splits), figsize=(5.5 * len(splits), height), squeeze=False, sharey=True)
    y = np.arange(len(names))
    for ax, split in zip(axes[0], splits):
        per_shift, clean = shift[split]["per_shift"], shift[split].get("clean") or {}
        if stress and split == "val":
            per_shift = {STRESS_BAR: stress, **per_shift}
        for offset, (metric, label, color) in zip((-0.2, 0.2), bars):
            values = [np.nan if per_shift.get(n, {}).get(metric) is None else per_shift[n][metric] for n in names]
            ax.barh(y + offset, values, height=0.4, color=color, label=label)
            if clean.get(metric) is not None:
                ax.axvline(clean[metric], color=color, ls="--", lw=1)
        reference = ", ".join(f"{label} {format_metric(clean[m])}" for m, label, _ in bars if clean.get(m) is not None)
        ax.set(xlim=(0, 1), ylim=(len(names) - 0.5, -0.5), xlabel="score",
               title=f"{split}: clean (dashed) {reference}" if reference else split)
        ax.set_yticks(y, names)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2)
    fig.subplots_adjust(left=0.14, right=0.98, top=1 - 0.4 / height, bottom=1.05 / height, wspace=0.08)
    return _png(fig)


STRESS_BAR = "stress val"  # short: the y labels have a fixed margin


def render_all(
    predictions: Predictions,
    threshold: float,
    history: list[dict[str, Any]],
    *,
    best_epoch: Optional[int] = None,
    shift: Optional[dict[str, dict[str, Any]]] = None,
    stress: Optional[dict[str, Any]] = None,
) -> dict[str, bytes]:
    """Every picture of a version, {file name: PNG bytes}; the shift chart only with shift results."""
    pngs = {
        "roc.png": roc_curves(predictions, threshold),
        "precision_recall.png": pr_curves(predictions, threshold),
        "confusion_matrix.png": confusion_matrices(predictions, threshold),
        "score_histogram.png": score_histograms(predictions, threshold),
        "reliability.png": reliability(predictions),
    }
    if history:
        pngs["learning_curves.png"] = learning_curves(history, best_epoch)
    if shift:
        pngs["shift_suite.png"] = shift_suite(shift, stress)
    return pngs


def render_evaluation(evaluation) -> dict[str, bytes]:
    """Every picture of a ``pneumo.evaluate.Evaluation``."""
    return render_all(
        evaluation.predictions,
        evaluation.threshold,
        evaluation.history,
        best_epoch=evaluation.best_epoch,
        shift=evaluation.metrics.get("shift"),
        stress=evaluation.metrics.get("stress_val"),
    )


def write_all(folder_uri: str, pngs: dict[str, bytes]) -> list[str]:
    """Write the PNGs into a version folder (local or s3://), never replacing a file; their URIs."""
    uris = []
    for name, data in pngs.items():
        uri = storage.join(folder_uri, name)
        storage.write_bytes(uri, data, if_absent=True)
        uris.append(uri)
    return uris


def drift_picture(
    feature_ks: list[float],
    grid: Optional[tuple[int, int]],
    score_quantiles: Optional[list[float]] = None,
    scores: Optional[np.ndarray] = None,
) -> bytes:
    """A drift check (pneumo.drift): each feature's KS distance to the reference on the pooling grid
    (one block per pooling part, side by side), and the batch's scores beside the val films' (from
    their quantiles), as shares of films per twentieth of [0, 1]."""
    with_scores = score_quantiles is not None and scores is not None and len(scores)
    fig, axes = _subplots(1, 2 if with_scores else 1, figsize=(10 if with_scores else 5.5, 3.4), squeeze=False)
    ks = np.asarray(feature_ks, dtype=float)
    ax = axes[0][0]
    if grid and ks.size and ks.size % (grid[0] * grid[1]) == 0:
        parts = ks.size // (grid[0] * grid[1])
        image = ax.imshow(np.hstack(ks.reshape(parts, *grid)), cmap="magma", vmin=0, vmax=max(0.3, float(ks.max())))
        for part in range(1, parts):
            ax.axvline(part * grid[1] - 0.5, color="white", lw=2)
        ax.set(xticks=[], yticks=[], title="KS distance per feature (pooling grid; parts side by side)")
        fig.colorbar(image, ax=ax, fraction=0.04)
    else:
        ax.bar(np.arange(ks.size), ks, color="tab:purple")
        ax.set(xlabel="feature", ylabel="KS distance", title="KS distance per feature")
    if with_scores:
        bins = np.linspace(0, 1, 21)
        levels = np.linspace(0, 1, len(score_quantiles))
        expected = np.diff(np.interp(bins, score_quantiles, levels))
        current = np.histogram(np.clip(scores, 0, 1), bins=bins)[0] / len(scores)
        ax = axes[0][1]
        ax.stairs(expected, bins, color="tab:blue", lw=2, label="val films (reference)")
        ax.stairs(current, bins, color="tab:red", lw=2, label=f"this batch ({len(scores)})")
        ax.set(xlabel="PNEUMONIA probability", ylabel="share of films", title="scores: reference vs batch")
        ax.legend(loc="upper center")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.88, wspace=0.25)
    return _png(fig)
