"""What a run of the full flow tells its user: one outcome line, the run-summary artifact, the terminal's closing lines.

``summary`` is the flow's result: model, version, registered, champion, metrics per split,
and where the run's files are.
"""

from __future__ import annotations

from typing import Any

from pneumo import storage
from pneumo.evaluate import format_metric, small_split_warnings
from pneumo.report import REPORT_NAME

SPLITS = ("val", "test")
METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def run_summary(config: Any, registry: str, manifest: Any, sizes: Any, index: Any, quarantine_report: str, model: Any,
                known_versions: list[str], logger: Any) -> dict[str, Any]:
    """The full flow's result: what was registered, the champion, metrics, and where the run's files are."""
    from pneumo.registry import CHAMPION, describe_alias

    registered = model.version not in known_versions
    if not registered:
        logger.info("data, config and code unchanged since %s %s: no new version registered "
                    "(retrain trains anyway)", config.model_name, model.version)
    champion = describe_alias(registry, config.model_name, CHAMPION)
    if champion.startswith("broken"):
        logger.warning("champion alias %s", champion)
    report = model.card_uri.removesuffix("card.json") + REPORT_NAME  # a version registered before reports has none
    summary = {
        "model": f"{config.model_name} {model.version}", "version": model.version, "registered": registered,
        "champion": f"{config.model_name} {champion}", "champion_comparison": model.champion_comparison,
        "card": model.card_uri, "report": report if storage.exists(report) else None,
        "metrics": model.metrics, "manifest": manifest.uri, "dataset_version": manifest.digest,
        "images": manifest.n_images, "quarantined": manifest.n_quarantined + index.n_quarantined,
        "quarantine_report": quarantine_report, "shards_index": index.uri, "size_stats": sizes.uri, "registry": registry,
    }
    logger.info("run summary: %s", outcome_line(summary))
    return summary


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
    lines += [f"\n**Warning:** {warning}" for warning in small_split_warnings(summary["metrics"])]
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
    lines += [f"  warning      {warning}" for warning in small_split_warnings(summary["metrics"])]
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


def label_counts(predicted: dict[str, int]) -> str:
    """``{'NORMAL': 1478, 'PNEUMONIA': 20}`` as a person reads it: ``NORMAL 1478, PNEUMONIA 20``."""
    return ", ".join(f"{label} {count}" for label, count in predicted.items())


def predict_outcome(summary: dict[str, Any]) -> str:
    """One line for the batch flow's final state: what was scored, with which version, and the labels."""
    line = (f"scored {summary['scored']} of {summary['files']} files with {summary['model']} "
            f"({summary['quarantined']} quarantined): {label_counts(summary['predicted'])}")
    if summary.get("metrics"):
        line += f"; labelled AUC {format_metric(summary['metrics'].get('roc_auc'))}"
    return line


def print_batch_summary(summary: dict[str, Any], seconds: float) -> None:
    """The terminal's closing lines of `pneumo predict-batch`."""
    print(f"\npneumo: {summary['model']} scored {summary['scored']} of {summary['files']} files "
          f"({summary['quarantined']} quarantined) in {seconds:.0f} s\n"
          f"  predicted    {label_counts(summary['predicted'])}\n  predictions  {summary['predictions']}")
    if summary["metrics"]:
        shown = {k: format_metric(summary["metrics"][k]) for k in ("accuracy", "recall", "specificity", "f1", "roc_auc")}
        print(f"  labelled n={summary['metrics']['n']}: accuracy {shown['accuracy']}  recall {shown['recall']}  "
              f"specificity {shown['specificity']}  F1 {shown['f1']}  AUC {shown['roc_auc']}")
