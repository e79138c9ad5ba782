"""Prefect artifacts shared by the tasks."""

from __future__ import annotations

import base64
from typing import Iterable

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pneumo import evaluate
from pneumo.manifest import QuarantineEntry


def quarantine_artifact(entries: Iterable[QuarantineEntry], *, key: str) -> None:
    """A table of the images that were set aside, each with its reason."""
    rows = [entry.model_dump() for entry in entries]
    create_table_artifact(
        key=key,
        table=rows,
        description=f"{len(rows)} input file(s) quarantined, each with the reason",
    )


def progress_logger(logger, what: str, every: int = 1000):
    """A ``progress(done, total)`` callback that logs every ``every`` items and at the end."""

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            logger.info("%s: %d/%d", what, done, total)

    return progress


# Titles of the pictures, in the order the report shows them.
PICTURES = {
    "roc.png": "ROC curves",
    "precision_recall.png": "Precision-recall curves",
    "confusion_matrix.png": "Confusion matrices",
    "score_histogram.png": "Scores by true class",
    "reliability.png": "Reliability",
    "learning_curves.png": "Learning curves",
    "shift_suite.png": "Shift suite",
}


def _shift_table(shift: dict) -> str:
    lines = ["| split | shift | ROC AUC | specificity | sensitivity | accuracy |", "|---|---|---:|---:|---:|---:|"]
    for split, result in shift.items():
        rows = {"clean": result.get("clean") or {}, **result["per_shift"]}
        for name, m in rows.items():
            cells = ["n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in ("roc_auc", "specificity", "sensitivity", "accuracy")]
            lines.append("| " + " | ".join([split, name, *cells]) + " |")
        worst = result.get("worst") or {}
        cells = ["n/a" if not worst.get(k) else f"{worst[k][0]:.3f} ({worst[k][1]})" for k in ("roc_auc", "specificity", "sensitivity", "accuracy")]
        lines.append("| " + " | ".join([split, "**worst**", *cells]) + " |")
    return "\n".join(lines) + "\n"


def model_report_artifacts(model_name: str, version: str, evaluation: "evaluate.Evaluation", pngs: dict[str, bytes], card_uri: str) -> None:
    """The version's metrics with 95% CIs, and its pictures, as markdown artifacts the Prefect UI shows.

    The UI runs in a browser that cannot read the registry (a local path or a private S3
    key), so each PNG is embedded in the markdown as a ``data:image/png;base64`` URI.
    """
    layout = evaluate.CONFUSION_MATRIX_LAYOUT
    markdown = (
        f"# {model_name} {version}\n\n"
        f"Threshold **{evaluation.threshold:g}** (a PNEUMONIA probability at or above it predicts PNEUMONIA). "
        "Percent, with 95% bootstrap intervals resampled by patient.\n\n"
        f"{evaluate.ci_markdown_table({s: evaluation.metrics[s] for s in ('val', 'test') if s in evaluation.metrics})}\n"
        f"Confusion matrices {layout}.\n\n"
    )
    if "shift" in evaluation.metrics:
        markdown += "## Shift suite\n\n" + _shift_table(evaluation.metrics["shift"]) + "\n"
    markdown += f"Card: `{card_uri}`\n"
    create_markdown_artifact(key="model-card", markdown=markdown, description=f"{model_name} {version}: metrics with 95% CIs")

    pictures = [f"# {model_name} {version}: pictures\n"]
    for name in sorted(pngs, key=lambda n: list(PICTURES).index(n) if n in PICTURES else len(PICTURES)):
        encoded = base64.b64encode(pngs[name]).decode("ascii")
        pictures.append(f"## {PICTURES.get(name, name)}\n\n![{name}](data:image/png;base64,{encoded})\n")
    create_markdown_artifact(
        key="model-pictures", markdown="\n".join(pictures), description=f"{model_name} {version}: {len(pngs)} pictures"
    )
