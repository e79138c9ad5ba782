"""The version's report as Prefect artifacts: metric table with CIs, and pictures embedded in the markdown.

The browser showing the Prefect UI cannot read the registry, so the pictures must travel
inside the artifact: each one as a data:image/png;base64 URI that decodes to the PNG written
beside the card.
"""

from __future__ import annotations

import base64
import re

import numpy as np
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.context import get_run_context

from pneumo import evaluate, plots
from tasks.reporting import model_report_artifacts


def _evaluation() -> evaluate.Evaluation:
    rng = np.random.default_rng(0)
    predictions, scored = {}, {}
    for split, n in (("val", 300), ("test", 400)):
        y = (rng.random(n) >= 0.375).astype(int)
        p = 1 / (1 + np.exp(-(np.where(y == 1, 1.2, -0.8) + rng.normal(0, 1, n))))
        predictions[split] = (y, p)
        scored[split] = evaluate.metrics_with_ci(y, p, np.arange(n) // 2, 0.5, n_boot=200)
    shift = {
        split: {
            "per_shift": {"blur": {"roc_auc": 0.81, "specificity": 0.42, "sensitivity": 0.97, "accuracy": 0.76},
                          "jpeg": {"roc_auc": 0.88, "specificity": 0.61, "sensitivity": 0.95, "accuracy": 0.82}},
            "clean": {"roc_auc": 0.93, "specificity": 0.8, "sensitivity": 0.94, "accuracy": 0.88},
            "worst": {"roc_auc": [0.81, "blur"], "specificity": [0.42, "blur"], "sensitivity": [0.95, "jpeg"],
                      "accuracy": [0.76, "blur"]},
        }
        for split in ("val", "test")
    }
    scored["shift"] = shift
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.01, "val_auc": 0.9} for e in range(1, 21)]
    return evaluate.Evaluation(0.5, predictions, scored, history, best_epoch=12)


def test_report_artifacts_carry_the_ci_table_and_every_picture():
    evaluation = _evaluation()
    pngs = plots.render_evaluation(evaluation)

    @flow
    def report():
        model_report_artifacts(
            "tinynet", "v0007", evaluation.metrics, 0.5, pngs, "/registry/tinynet/v0007/card.json"
        )
        return get_run_context().flow_run.id

    run_id = report()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"model-card", "model-pictures"} <= set(by_key)

    card = by_key["model-card"].data
    low, high = evaluation.metrics["test"]["ci95"]["accuracy"]
    assert f"({100 * low:.1f}-{100 * high:.1f})" in card
    assert "Threshold **0.5**" in card and "[[tn, fp], [fn, tp]]" in card
    for split in ("val", "test"):  # the matrices themselves, not only their layout
        (tn, fp), (fn, tp) = evaluation.metrics[split]["confusion_matrix"]
        assert f"**{split}** (n={tn + fp + fn + tp})" in card
        assert f"| NORMAL | {tn} (tn) | {fp} (fp) |" in card and f"| PNEUMONIA | {fn} (fn) | {tp} (tp) |" in card

    assert "| shift | val ROC AUC | val specificity | test ROC AUC | test specificity |" in card
    assert "| blur | 0.810 | 0.420 | 0.810 | 0.420 |" in card
    assert "| **worst** | **0.810** (blur) | **0.420** (blur) |" in card

    embedded = re.findall(r"!\[([\w.]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", by_key["model-pictures"].data)
    assert {name for name, _ in embedded} == set(pngs) and len(pngs) == 7
    for name, data in embedded:
        assert base64.b64decode(data) == pngs[name]


def test_the_metrics_table_shows_four_digits():
    evaluation = _evaluation()
    rows = evaluate.rows({split: evaluation.metrics[split] for split in ("val", "test")}, digits=4)
    for row, split in zip(rows, ("val", "test")):
        assert row["roc_auc"] == f"{evaluation.metrics[split]['roc_auc']:.4f}" and len(row["roc_auc"]) == 6
        assert row["n"] == evaluation.metrics[split]["n"] and isinstance(row["tp"], int)


def test_names_in_the_quarantine_and_prediction_artifacts_are_shown_as_written(tmp_path):
    """Issue 23, item 11: the UI renders table cells, descriptions and link texts as markdown; a workdir or file
    name holding a backtick, an element or a `|` was drawn as markup (or split the table)."""
    import html
    import json

    from markdown_it import MarkdownIt

    from pneumo.manifest import QuarantineEntry, SkippedEntry
    from tasks.reporting import publish_predictions, quarantine_artifact

    hostile = "a`<img src=x onerror=alert(1)>`|b"
    workdir = tmp_path / f"work{hostile}"
    entries = [QuarantineEntry(relpath=f"train/NORMAL/{hostile}.jpeg", stage="decode", reason=f"cannot read {workdir}/x")]
    skipped = [SkippedEntry(relpath=f"__MACOSX/{hostile}", reason="OS metadata")]
    row = {"relpath": f"NORMAL/{hostile}.jpeg", "probability": 0.2, "label": "NORMAL", "threshold": 0.5, "warnings": "",
           "true_label": "NORMAL", "distance": 12.5, "error": None}
    summary = {"input": str(tmp_path / f"in{hostile}"), "predictions": f"{workdir}/p.csv", "model": "tinynet v0001",
               "predicted": {"NORMAL": 1, "PNEUMONIA": 0}, "files": 1, "scored": 1, "quarantined": 0, "with_warnings": 0}

    @flow
    def report():
        quarantine_artifact(entries, key="quarantine-report", skipped=skipped)
        publish_predictions(summary, [row], 0.5)
        return get_run_context().flow_run.id

    run_id = report()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    renderer = MarkdownIt("commonmark", {"html": True}).enable("table")
    renderer.validateLink = lambda url: True  # markdown-it refuses file: links, the UI draws them
    render = renderer.render
    by_key = {a.key: a for a in artifacts}

    def shown(markdown: str) -> str:  # one table cell, a description or a link as the UI draws it
        rendered = render(f"| x |\n|---|\n| {markdown} |\n")
        assert "<img" not in rendered and "<code>" not in rendered and rendered.count("<td>") == 1, rendered
        return html.unescape(rendered.split("<td>")[1].split("</td>")[0])

    quarantined = json.loads(by_key["quarantine-report"].data)
    assert [shown(r["relpath"]) for r in quarantined] == [entries[0].relpath, skipped[0].relpath]
    assert shown(quarantined[0]["reason"]) == entries[0].reason
    assert shown(json.loads(by_key["predictions"].data)[0]["relpath"]) == row["relpath"]
    for key in ("predict-metrics", "predict-counts", "predictions", "predictions-file"):
        for text in (by_key[key].description or "", by_key[key].data if key in ("predict-metrics", "predictions-file") else ""):
            assert "<img" not in render(text), (key, text)
    assert summary["input"] in html.unescape(render(by_key["predict-metrics"].data))
    link = render(by_key["predictions-file"].data)
    assert link.startswith('<p><a href="file:///') and link.count("<a ") == 1, link
    assert html.unescape(link.split(">", 2)[2].split("</a>")[0]) == summary["predictions"]
