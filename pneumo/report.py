"""The report beside every model: one HTML page, read from disk in any browser.

``report.html`` is written into each registered version next to ``card.json``: the metrics
with their confidence intervals, the confusion matrices, the pictures, the shift table, the
threshold and how it was chosen, the config, the data and code digests and the champion
decision. It is built from the card and the pictures only, so it shows exactly what the
card records. Self-contained: the pictures are inline (``data:`` URIs), there is no script,
stylesheet or font to fetch, so it opens from a folder, an e-mail or an S3 download.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from pneumo.drift import DRIFT_ALPHA
from pneumo.evaluate import CI_METRICS, format_metric
from pneumo.labels import LABELS
from pneumo.registry import CardContent, CardData, CardTraining

REPORT_NAME = "report.html"

# Pictures in reading order, with what each shows; any other PNG follows in name order.
PICTURES = {
    "roc.png": "ROC curves, val and test, with the operating point at the threshold",
    "precision_recall.png": "Precision against recall, with the operating point at the threshold",
    "confusion_matrix.png": "Confusion matrices at the threshold",
    "score_histogram.png": "PNEUMONIA probabilities by true class",
    "reliability.png": "Reliability: predicted probability against observed frequency (Brier score)",
    "learning_curves.png": "Learning curves: train and val loss, val AUC, best epoch",
    "shift_suite.png": "Val and test under the acquisition shifts",
}
SHIFT_METRICS = ("roc_auc", "specificity", "sensitivity", "accuracy")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f3f3f3; }
.ci { color: #666; font-size: 0.85em; } .worst { background: #fde2e2; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 520px; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.promoted { color: #17692b; font-weight: bold; } .kept { color: #8a5a00; font-weight: bold; }
"""


def render(card: CardContent, pictures: dict[str, bytes]) -> str:
    """The report of the version ``card`` describes (a full card: ``register`` adds version and files)."""
    name, version = card.model_name or "model", card.version or "?"
    title = f"{name} {version}"
    sections = [
        f"<h1>{escape(title)}</h1>",
        _summary(card),
        "<h2>Metrics</h2>",
        _metrics_table(card),
        "<h2>Confusion matrices</h2>",
        _confusion_matrices(card),
        "<h2>Threshold</h2>",
        _threshold(card),
        "<h2>Champion decision</h2>",
        _champion(card),
        "<h2>Shift suite</h2>",
        _shift_tables(card),
        "<h2>Drift of the training films</h2>",
        _drift(card.as_json().get("drift")),
        "<h2>Pictures</h2>",
        _pictures(pictures),
        "<h2>Data and code</h2>",
        _provenance(card),
        "<h2>Config</h2>",
        f"<pre>{escape(json.dumps(card.as_json().get('config', {}), indent=2, sort_keys=True))}</pre>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)} report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None, numeric: bool = True) -> str:
    """An HTML table; cells are already escaped HTML, ``classes`` (one per row) mark rows.
    ``numeric``: every column after the first is right-aligned figures."""
    head = f"<thead><tr>{''.join(f'<th>{cell}</th>' for cell in header)}</tr></thead>" if any(header) else ""
    body = []
    for at, row in enumerate(rows):
        cls = f' class="{classes[at]}"' if classes and classes[at] else ""
        cells = "".join(f"<td>{cell}</td>" if i == 0 or not numeric else f'<td class="num">{cell}</td>' for i, cell in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _summary(card: CardContent) -> str:
    training = card.training or CardTraining()
    shown = {key: "-" if value is None else value for key, value in training}
    recipe = card.recipe or (card.config.recipe if card.config else None)
    rows = [
        ["created", escape(card.created_at or "-")],
        ["recipe", escape(recipe or "-")],
        ["parameters", escape("-" if card.n_parameters is None else f"{card.n_parameters:,}")],
        ["training", escape(
            f"best epoch {shown['best_epoch']} of {shown['epochs_run']}"
            f"{' (stopped early)' if training.stopped_early else ''}, {shown['n_train']} rows, {shown['seconds']} s"
        )],
    ]
    return _table(["", ""], rows, numeric=False)


def _with_ci(value: Any, interval: Any) -> str:
    shown = escape(format_metric(value))
    if isinstance(interval, list) and len(interval) == 2 and None not in interval:
        shown += f' <span class="ci">[{format_metric(interval[0])}, {format_metric(interval[1])}]</span>'
    return shown


def _metrics_table(card: CardContent) -> str:
    metrics = card.metrics
    rows = []
    for split in ("val", "stress_val", "test"):  # stress_val: val under random strong jitters (pneumo.shift)
        m = metrics.get(split)
        if not m:
            continue
        ci = m.get("ci95") or {}
        rows.append([split, escape(str(m.get("n", "-"))), *(_with_ci(m.get(k), ci.get(k)) for k in CI_METRICS)])
    if not rows:
        return "<p>No metrics recorded.</p>"
    note = (
        "<p>In brackets: 95% bootstrap interval, resampling patients (all of a patient's images together). "
        "Two versions whose intervals overlap are not known to differ.</p>"
    )
    return _table(["split", "n", *CI_METRICS], rows) + note


def _confusion_matrices(card: CardContent) -> str:
    labels = card.labels or LABELS
    negative, positive = escape(labels["0"]), escape(labels["1"])
    parts = []
    for split in ("val", "test"):
        matrix = (card.metrics.get(split) or {}).get("confusion_matrix")
        if not matrix:
            continue
        (tn, fp), (fn, tp) = matrix
        parts.append(
            f"<h3>{split}</h3>"
            + _table(
                ["truth \\ predicted", negative, positive],
                [[negative, str(tn), str(fp)], [positive, str(fn), str(tp)]],
            )
        )
    return "".join(parts) or "<p>No confusion matrix recorded.</p>"


def _threshold(card: CardContent) -> str:
    threshold = card.decision_threshold
    how = card.threshold_choice  # a recipe that tunes its threshold says how in the card
    if not how and card.threshold_rule == "stress_youden":
        how = (
            "chosen on the stress val (val under random strong jitters), where it maximizes Youden's J "
            "(sensitivity + specificity - 1); every metric in this report and every prediction uses it"
        )
    if not how:
        how = (
            "fixed by the training config (config.train.threshold), not tuned on val or test; "
            "every metric in this report and every prediction uses it"
        )
    if isinstance(how, dict):
        how = "; ".join(f"{k}: {v}" for k, v in how.items())
    shown = format_metric(threshold, 4) if isinstance(threshold, (int, float)) else str(threshold)
    return f"<p>PNEUMONIA when the probability is at least <b>{escape(shown)}</b>: {escape(str(how))}.</p>"


def _champion(card: CardContent) -> str:
    comparison = card.champion_comparison
    if comparison is None:
        return "<p>No champion comparison recorded.</p>"
    verdict = (
        '<span class="promoted">promoted to champion</span>' if comparison.promoted else '<span class="kept">not promoted</span>'
    )
    rows = [
        ["decision", f"{verdict}: {escape(str(comparison.reason))}"],
        ["rule", escape(f"{comparison.decided_by or 'val ' + str(comparison.metric)}, strictly greater wins")],
        ["this version", escape(format_metric(comparison.challenger_value, 4))],
        ["champion", escape(f"{comparison.champion_version or 'none'}: {format_metric(comparison.champion_value, 4)}")],
        ["champion figures", escape(comparison.basis or "-")],
    ]
    rows += [["note", escape(note)] for note in comparison.notes]
    return _table(["", ""], rows, numeric=False) + (
        "<p>As decided at registration; <code>promotion.json</code> beside the card says how the "
        "promotion ended if another run moved the champion meanwhile.</p>"
    )


def _drift(record: Any) -> str:
    """The check of the training films against the champion's reference, before training (pneumo.drift)."""
    if not isinstance(record, dict):
        return "<p>No drift check recorded (the first version, or one registered before drift checks).</p>"
    if not record.get("verdict"):
        return f"<p>{escape(str(record.get('message', 'no verdict')))}</p>"
    rows = [["verdict", f"<b>{escape(str(record['verdict']))}</b>"], ["against", escape(str(record.get("against")))],
            ["films", escape(str(record.get("n_films")))]]
    rows += [[f"p-value, {escape(str(name))}", "n/a" if p is None else f"{p:.3g}"]
             for name, p in (record.get("p_values") or {}).items()]
    rows += [["most moved", escape(f"{f['name']} (KS {f['ks']:.3f})")] for f in record.get("top_features") or []][:3]
    return _table(["", ""], rows, numeric=False) + (
        "<p>The training films against the champion's reference, before training: <code>drift</code> when a test's "
        f"p-value times the number of tests is under {DRIFT_ALPHA} (pneumo/drift.py).</p>")


def _shift_tables(card: CardContent) -> str:
    shift = card.metrics.get("shift") or {}
    parts = []
    for split, suite in shift.items():
        per_shift = suite.get("per_shift") or {}
        if not per_shift:
            continue
        worst = suite.get("worst") or {}
        worst_names = {entry[1] for entry in worst.values() if entry}
        clean = suite.get("clean")
        rows, classes = [], []
        if clean:
            rows.append(["clean", *(escape(format_metric(clean.get(m))) for m in SHIFT_METRICS)])
            classes.append("")
        for name, scores in per_shift.items():
            rows.append([escape(name), *(escape(format_metric(scores.get(m))) for m in SHIFT_METRICS)])
            classes.append("worst" if name in worst_names else "")
        worst_row = [
            "<b>worst</b>",
            *(escape(f"{format_metric(worst[m][0])} ({worst[m][1]})") if worst.get(m) else "n/a" for m in SHIFT_METRICS),
        ]
        rows.append(worst_row)
        classes.append("")
        parts.append(f"<h3>{escape(split)}</h3>" + _table(["shift", *SHIFT_METRICS], rows, classes))
    if not parts:
        return "<p>No shift suite recorded (the shards carry no shifted features).</p>"
    return "".join(parts) + "<p>Highlighted rows hold the worst value of at least one metric.</p>"


def _pictures(pictures: dict[str, bytes]) -> str:
    names = [n for n in PICTURES if n in pictures] + sorted(n for n in pictures if n not in PICTURES)
    figures = []
    for name in names:
        data = base64.b64encode(pictures[name]).decode("ascii")
        caption = escape(PICTURES.get(name, name))
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{escape(name)}" data-name="{escape(name)}">'
            f"<figcaption>{escape(name)}: {caption}</figcaption></figure>"
        )
    return "\n".join(figures) or "<p>No pictures.</p>"


def _provenance(card: CardContent) -> str:
    data = card.data or CardData()
    rows = [
        ["manifest digest (dataset version)", f"<code>{escape(data.manifest_digest or '-')}</code>"],
        ["shard index digest", f"<code>{escape(data.shards_digest or '-')}</code>"],
        ["code version", f"<code>{escape(card.code_version or '-')}</code>"],
        ["counts", f"<code>{escape(json.dumps(data.counts))}</code>"],
    ]
    for name, entry in sorted((card.files or {}).items()):
        rows.append([escape(name), f"<code>sha256 {escape(entry.sha256)}</code>, {entry.bytes} bytes"])
    return _table(["", ""], rows, numeric=False)
