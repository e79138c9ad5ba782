"""What a run of the full flow tells its user: one outcome line, the run-summary artifact, the terminal's closing lines.

``summary`` is the flow's result: model, version, registered, champion, metrics per split,
and where the run's files are.
"""

from __future__ import annotations

from typing import Any

from pneumo.evaluate import format_metric

SPLITS = ("val", "test")
METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def outcome_line(summary: dict[str, Any]) -> str:
    """One line: what was registered (or not), the champion, and the val/test AUC."""
    name, version = summary["model"].rsplit(" ", 1)
    if summary["registered"]:
        head = f"registered {name} {version}"
    else:
        head = f"nothing new registered (cache hit; {name} {version} unchanged; --retrain to train anyway)"
    aucs = ", ".join(f"{split} AUC {format_metric((summary['metrics'].get(split) or {}).get('roc_auc'))}" for split in SPLITS)
    return f"{head}; champion {summary['champion'].split(' ', 1)[1]}; {aucs}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run-summary artifact: outcome, metrics per split, and where everything is."""
    lines = [
        f"# {outcome_line(summary).split(';')[0]}", "",
        f"Champion: **{summary['champion']}**. Images: {summary['images']} ({summary['quarantined']} quarantined).", "",
        "| split | n | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS),
    ]
    for split in SPLITS:
        m = summary["metrics"].get(split) or {}
        lines.append(f"| {split} | {m.get('n', '-')} | " + " | ".join(format_metric(m.get(k)) for k in METRICS) + " |")
    lines += ["", f"- card: `{summary['card']}`", f"- report: `{summary.get('report') or 'none'}`", f"- registry: `{summary['registry']}`",
              f"- shards: `{summary['shards_index']}`", f"- quarantine report: `{summary['quarantine_report']}`"]
    return "\n".join(lines) + "\n"


def closing_line(summary: dict[str, Any]) -> str:
    """What the run did to the registry, as the user's closing line says it."""
    if summary["registered"]:
        return f"registered {summary['model']}"
    return f"nothing new registered (cache hit; --retrain to train anyway): {summary['model']} is unchanged"


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    """The terminal's closing lines of `pneumo run`."""
    lines = [
        "",
        f"pneumo: {closing_line(summary)} ({seconds:.0f} s)",
        f"  images       {summary['images']} ({summary['quarantined']} quarantined)",
    ]
    for split in SPLITS:
        m = summary["metrics"][split]
        shown = dict(zip(METRICS, (format_metric(m[k]) for k in METRICS)))
        lines.append(
            f"  {split:<5} n={m['n']:<5} accuracy {shown['accuracy']}  precision {shown['precision']}  "
            f"recall {shown['recall']}  specificity {shown['specificity']}  F1 {shown['f1']}  AUC {shown['roc_auc']}"
        )
    lines += [
        f"  champion     {summary['champion']}",
        f"  card         {summary['card']}",
        f"  report       {summary.get('report') or 'none (registered before reports were written)'}",
        f"  shards       {summary['shards_index']}",
        f"  manifest     {summary['manifest']}",
        f"  size stats   {summary['size_stats']}",
        f"  quarantine   {summary['quarantine_report']}",
    ]
    print("\n".join(lines))
