"""Prefect artifacts shared by the tasks."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Optional

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pneumo import evaluate, storage
from pneumo import markdown as md
from pneumo.labels import CLASSES, CONFUSION_MATRIX_LAYOUT
from pneumo.manifest import QuarantineEntry, SkippedEntry

FIRST_ROWS = 10  # rows of the predictions shown in the table artifact


def quarantine_artifact(
    entries: Iterable[QuarantineEntry], *, key: str, skipped: Iterable[SkippedEntry] = ()
) -> None:
    """A table of the images that were set aside, each with its reason, then the OS metadata skipped."""
    # The UI renders each cell as markdown: a file name or a reason holding markup is shown as written.
    rows = [{**entry.model_dump(), "relpath": md.text(entry.relpath), "reason": md.text(entry.reason)} for entry in entries]
    junk = [{"relpath": md.text(e.relpath), "stage": "skipped", "reason": md.text(e.reason)} for e in skipped]
    description = f"{len(rows)} input file(s) quarantined, each with the reason"
    if junk:
        description += f"; {len(junk)} OS metadata file(s) skipped (stage 'skipped')"
    create_table_artifact(key=key, table=rows + junk, description=description)


def predict_quarantine(rows: list[dict[str, Any]], uri: str, logger: Any) -> Optional[str]:
    """The batch run's rows that were not scored, each with its reason, written to ``uri`` (JSON) and shown as
    the predict-quarantine artifact; ``uri``, or None when every file was scored."""
    bad = [QuarantineEntry(relpath=row["relpath"], stage="predict", reason=row["error"]) for row in rows if row["error"]]
    if not bad:
        return None
    storage.write_json(uri, [entry.model_dump() for entry in bad])
    quarantine_artifact(bad, key="predict-quarantine")
    logger.warning("%d file(s) quarantined (not scored); reasons in %s", len(bad), uri)
    return uri


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
    """One row per shift, ROC AUC and specificity per split; the clean scores first, the worst case last."""
    splits = sorted(shift, key=lambda s: (s != "val", s))
    metrics = (("roc_auc", "ROC AUC"), ("specificity", "specificity"))
    header = ["shift", *[f"{split} {label}" for split in splits for _, label in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    names = ["clean", *shift[splits[0]]["per_shift"]]
    for name in names:
        cells = []
        for split in splits:
            row = (shift[split].get("clean") if name == "clean" else shift[split]["per_shift"].get(name)) or {}
            cells += [evaluate.format_metric(row.get(metric)) for metric, _ in metrics]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    cells = []
    for split in splits:
        worst = shift[split].get("worst") or {}
        cells += ["n/a" if not worst.get(m) else f"**{evaluate.format_metric(worst[m][0])}** ({worst[m][1]})" for m, _ in metrics]
    lines.append("| " + " | ".join(["**worst**", *cells]) + " |")
    return "\n".join(lines) + "\n"


def confusion_markdown(metrics: dict) -> str:
    """One table per split: rows are the truth, columns the prediction, at the version's threshold."""
    tables = []
    for split in ("val", "test"):
        if "confusion_matrix" not in (metrics.get(split) or {}):
            continue
        (tn, fp), (fn, tp) = metrics[split]["confusion_matrix"]
        tables.append(
            f"**{split}** (n={tn + fp + fn + tp})\n\n"
            f"| truth \\ predicted | {CLASSES[0]} | {CLASSES[1]} |\n|---|---:|---:|\n"
            f"| {CLASSES[0]} | {tn} (tn) | {fp} (fp) |\n| {CLASSES[1]} | {fn} (fn) | {tp} (tp) |\n"
        )
    return "\n".join(tables) + f"\nLayout of the card's `confusion_matrix`: {CONFUSION_MATRIX_LAYOUT}.\n"


def model_report_artifacts(
    model_name: str, version: str, metrics: dict, threshold: float, pngs: dict[str, bytes], card_uri: str
) -> None:
    """The version's metrics with 95% CIs (the card's ``metrics``), and its pictures, as markdown
    artifacts the Prefect UI shows.

    The UI runs in a browser that cannot read the registry (a local path or a private S3
    key), so each PNG is embedded in the markdown as a ``data:image/png;base64`` URI.
    """
    markdown = (
        f"# {model_name} {version}\n\n"
        f"Threshold **{threshold:g}** (a PNEUMONIA probability at or above it predicts PNEUMONIA). "
        "Percent, with 95% bootstrap intervals resampled by patient.\n\n"
        f"{evaluate.ci_markdown_table({s: metrics[s] for s in ('val', 'stress_val', 'test') if s in metrics})}\n"
        "stress_val: every val image under random strong jitters (pneumo.shift.stress_features), an evaluation "
        "set never trained on.\n\n"
        f"## Confusion matrices\n\n{confusion_markdown(metrics)}\n"
    )
    if metrics.get("shift"):
        markdown += "## Shift suite\n\n" + _shift_table(metrics["shift"]) + "\n"
    markdown += f"Card: {md.code(card_uri)}\n"
    create_markdown_artifact(key="model-card", markdown=markdown, description=f"{model_name} {version}: metrics with 95% CIs")

    pictures = [f"# {model_name} {version}: pictures\n"]
    for name in sorted(pngs, key=lambda n: list(PICTURES).index(n) if n in PICTURES else len(PICTURES)):
        encoded = base64.b64encode(pngs[name]).decode("ascii")
        pictures.append(f"## {PICTURES.get(name, name)}\n\n![{name}](data:image/png;base64,{encoded})\n")
    create_markdown_artifact(
        key="model-pictures", markdown="\n".join(pictures), description=f"{model_name} {version}: {len(pngs)} pictures"
    )


def publish_predictions(summary: dict[str, Any], scored: list[dict], threshold: float) -> None:
    """The batch flow's: the metrics against the input's labels, if any, and the run's artifacts: counts, first rows, the CSV."""
    from pneumo.predict import PREDICTION_COLUMNS

    input, uri = summary["input"], summary["predictions"]
    model_name, version = summary["model"].rsplit(" ", 1)
    counts = summary["predicted"]
    labelled = [row for row in scored if row["true_label"]]
    if labelled:
        truth = [CLASSES.index(row["true_label"]) for row in labelled]
        summary["metrics"] = evaluate.metrics(truth, [row["probability"] for row in labelled], threshold)
        create_markdown_artifact(
            key="predict-metrics",
            markdown=(
                f"# {model_name} {version} on {md.text(input)}\n\n{len(labelled)} labelled images, threshold {threshold:g}\n\n"
                + evaluate.markdown_table({"input": summary["metrics"]})
            ),
            description=f"{model_name} {version} scored against the input's labels",
        )
    create_table_artifact(
        key="predict-counts",
        table=[{k: summary[k] for k in ("model", "files", "scored", "quarantined", "with_warnings")} | counts],
        description=f"{model_name} {version} on {md.text(input)}: files scored and predicted labels",
    )
    create_table_artifact(
        key="predictions",
        table=[{k: md.text(row[k]) if isinstance(row[k], str) else row[k] for k in PREDICTION_COLUMNS} for row in scored[:FIRST_ROWS]],
        description=f"The first {FIRST_ROWS} of {len(scored)} predictions; all of them in {md.text(uri)}",
    )
    # Prefect writes the link as [text](link): both escaped, the link percent-encoded as a URI.
    link = urllib.parse.quote(uri, safe=":/") if storage.is_s3(uri) else Path(uri).as_uri()
    create_link_artifact(key="predictions-file", link=link, link_text=md.text(uri), description="The predictions CSV")

