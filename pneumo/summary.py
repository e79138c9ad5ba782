"""What a run, a batch run or a card tells a person: the outcome line, the run-summary markdown, the terminal's lines.

A run's ``summary`` is the full flow's result: model, version, registered, champion, metrics per
split, and where the run's files are. A batch run's is the batch flow's.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Optional

from pneumo import markdown as md
from pneumo import registry as reg
from pneumo import storage
from pneumo.evaluate import format_metric, small_split_warnings
from pneumo.labels import CLASSES
from pneumo.names import printable
from pneumo.report import REPORT_NAME

SPLITS = ("val", "test")
METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def run_summary(config: Any, registry: str, manifest: Any, sizes: Any, index: Any, quarantine_report: str, model: Any,
                known_versions: list[str], logger: Any) -> dict[str, Any]:
    """The full flow's result: what was registered, the champion, metrics, and where the run's files are."""
    registered = model.version not in known_versions
    if not registered:
        logger.info("data, config and code unchanged since %s %s: no new version registered "
                    "(retrain trains anyway)", config.model_name, model.version)
    champion = reg.describe_alias(registry, config.model_name, reg.CHAMPION)
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


def outcome_head(summary: dict[str, Any]) -> str:
    """What the run registered: "registered tinynet v0004", or why nothing (a cache hit)."""
    name, version = summary["model"].rsplit(" ", 1)
    if summary["registered"]:
        return f"registered {name} {version}"
    return f"nothing new registered (cache hit; {name} {version} unchanged; --retrain to train anyway)"


def outcome_line(summary: dict[str, Any]) -> str:
    """One line: what was registered (or not), the champion, and the val/test AUC."""
    aucs = ", ".join(f"{split} AUC {format_metric((summary['metrics'].get(split) or {}).get('roc_auc'))}" for split in SPLITS)
    return f"{outcome_head(summary)}; champion {summary['champion'].split(' ', 1)[1]}; {aucs}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run-summary artifact: outcome, metrics per split, and where everything is (paths escaped: pneumo.markdown)."""
    lines = [
        f"# {md.text(outcome_head(summary))}", "",
        f"Champion: **{md.text(summary['champion'])}**. Images: {summary['images']} ({summary['quarantined']} quarantined).", "",
        "| split | n | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS),
    ]
    for split in SPLITS:
        m = summary["metrics"].get(split) or {}
        lines.append(f"| {split} | {m.get('n', '-')} | " + " | ".join(format_metric(m.get(k)) for k in METRICS) + " |")
    lines += [f"\n**Warning:** {warning}" for warning in small_split_warnings(summary["metrics"])]
    lines += ["", f"- card: {md.code(summary['card'])}", f"- report: {md.code(summary.get('report') or 'none')}",
              f"- registry: {md.code(summary['registry'])}", f"- shards: {md.code(summary['shards_index'])}",
              f"- quarantine report: {md.code(summary['quarantine_report'])}"]
    return "\n".join(lines) + "\n"


def run_text(summary: dict[str, Any], seconds: float) -> str:
    """The closing lines of `pneumo run`."""
    if summary["registered"]:
        done = f"registered {summary['model']}"
    else:
        done = f"nothing new registered (cache hit; --retrain to train anyway): {summary['model']} is unchanged"
    lines = ["", f"pneumo: {done} ({seconds:.0f} s)", f"  images       {summary['images']} ({summary['quarantined']} quarantined)"]
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
    return "\n".join(lines)


def label_counts(predicted: dict[str, int]) -> str:
    """``{'NORMAL': 1478, 'PNEUMONIA': 20}`` as a person reads it: ``NORMAL 1478, PNEUMONIA 20``."""
    return ", ".join(f"{label} {count}" for label, count in predicted.items())


def batch_summary(model: str, threshold: float, input: str, rows: list[dict[str, Any]], predictions: str,
                  quarantine_report: Optional[str], cached: tuple[int, int]) -> dict[str, Any]:
    """The batch flow's result: the model ("tinynet v0003"), counts of the ``rows`` scored, where the files are, and
    ``cached`` = (chunks taken from the cache, chunks): all of them is a cache hit. ``metrics`` are added when labelled."""
    scored = [row for row in rows if row["error"] is None]
    return {
        "model": model, "threshold": threshold, "input": input, "files": len(rows), "scored": len(scored),
        "quarantined": len(rows) - len(scored), "predicted": {label: sum(row["label"] == label for row in scored) for label in CLASSES},
        "with_warnings": sum(bool(row["warnings"]) for row in scored), "predictions": predictions,
        "quarantine_report": quarantine_report, "metrics": None, "cached_chunks": cached[0], "chunks": cached[1],
    }


def cache_note(summary: dict[str, Any]) -> str:
    """How much of a batch run came from the cache: "" (none), "cache hit: ..." (all), or "k of n chunks from the cache"."""
    cached, chunks = summary.get("cached_chunks") or 0, summary.get("chunks") or 0
    if not cached:
        return ""
    if cached == chunks:
        return "cache hit: the same input and version were scored before, nothing scored again"
    return f"{cached} of {chunks} chunks from the cache"


def predict_outcome(summary: dict[str, Any]) -> str:
    """One line for the batch flow's final state: what was scored, with which version, the labels, and a cache hit."""
    line = (f"scored {summary['scored']} of {summary['files']} files with {summary['model']} "
            f"({summary['quarantined']} quarantined): {label_counts(summary['predicted'])}")
    if summary.get("metrics"):
        line += f"; labelled AUC {format_metric(summary['metrics'].get('roc_auc'))}"
    line += drift_words(summary.get("drift"), "; drift check: ")
    return f"{line}; {cache_note(summary)}" if cache_note(summary) else line


def drift_words(record: Optional[dict[str, Any]], lead: str) -> str:
    """A drift check's record (pneumo.drift.Outcome.record) in a few words, after ``lead``; '' without one."""
    if not record:
        return ""
    return lead + (f"{record['verdict']} (against {record['against']})" if record.get("verdict") else record.get("message", ""))


def batch_text(summary: dict[str, Any], seconds: float) -> str:
    """The closing lines of `pneumo predict-batch`."""
    text = (f"\npneumo: {summary['model']} scored {summary['scored']} of {summary['files']} files "
            f"({summary['quarantined']} quarantined) in {seconds:.0f} s\n"
            f"  predicted    {label_counts(summary['predicted'])}\n  predictions  {summary['predictions']}"
            + drift_words(summary.get("drift"), "\n  drift        "))
    if cache_note(summary):
        text += f"\n  cache        {cache_note(summary)}"
    if summary["metrics"]:
        shown = {k: format_metric(summary["metrics"][k]) for k in ("accuracy", "recall", "specificity", "f1", "roc_auc")}
        text += (f"\n  labelled n={summary['metrics']['n']}: accuracy {shown['accuracy']}  recall {shown['recall']}  "
                 f"specificity {shown['specificity']}  F1 {shown['f1']}  AUC {shown['roc_auc']}")
    return text


def prediction_table(results: list[Any]) -> list[str]:
    """`pneumo predict`'s table of Predictions: image, label, probability, the distance from the training
    films (pneumo.reference; '-' for a version without one), warnings (or the error)."""
    width = max(len(printable(p.input)) for p in results)
    lines = [f"{'image':<{width}}  {'label':<9}  probability  distance  warnings"]
    for p in results:
        distance = "-" if p.distance is None else f"{p.distance:.1f}"
        if p.ok:
            lines.append(f"{printable(p.input):<{width}}  {p.label:<9}  {p.probability:11.4f}  {distance:>8}  {'; '.join(p.warnings)}".rstrip())
        else:
            lines.append(f"{printable(p.input):<{width}}  {'-':<9}  {'-':>11}  {'-':>8}  error: {printable(p.error)}")
    return lines


# --------------------------------------------------------------------------- cards, as `pneumo models` shows them


def card_metric(card: reg.Card, split: str, name: str) -> str:
    value = (card.metrics.get(split) or {}).get(name)
    return "-" if value is None else format_metric(value)


def version_row(version: str, card: reg.Card, aliases: list[str]) -> str:
    """A row of `pneumo models list`, under VERSIONS_HEADER."""
    return printable(f"{version:<8} {card.created_at:<25} {card_metric(card, 'val', 'roc_auc'):>7} "
                     f"{card_metric(card, 'val', 'accuracy'):>7} {card_metric(card, 'test', 'roc_auc'):>8} "
                     f"{card_metric(card, 'test', 'accuracy'):>8}  {', '.join(sorted(aliases))}").rstrip()


VERSIONS_HEADER = f"{'version':<8} {'created':<25} {'val AUC':>7} {'val acc':>7} {'test AUC':>8} {'test acc':>8}  aliases"


def card_lines(card: reg.Card, registry: str, model_name: str, aliases: list[str]) -> list[str]:
    """A version's card, readably; ``aliases`` are those pointing at it now."""
    config = card.as_json().get("config", {})  # as recorded: shown as written
    lines = [
        f"{model_name} {card.version}  (card schema {card.schema_version or 1})",
        f"  created     {card.created_at}",
        f"  recipe      {card.recipe or '-'}",
        f"  threshold   {format_metric(card.decision_threshold, 4)} ({card.threshold_rule or 'fixed'})",
        f"  transform   {json.dumps(config.get('transform'))}",
        f"  train       {json.dumps(config.get('train'))}",
        f"  data        {json.dumps(card.data.counts if card.data else None)}",
        f"  export      {json.dumps(card.export)}",
    ]
    for split in [s for s in ("val", "stress_val", "test") if s in card.metrics or s != "stress_val"]:
        m = card.metrics.get(split) or {}
        ci = m.get("ci95") or {}
        shown = "  ".join(
            f"{k} {card_metric(card, split, k)}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if ci.get(k) else "")
            for k in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
        )
        lines.append(f"  {split:<11} n={m.get('n', '-')}  {shown}")
    if any((card.metrics.get(split) or {}).get("ci95") for split in SPLITS):
        lines.append("              [95% bootstrap interval, resampled by patient]")
    shift = card.metrics.get("shift") or {}
    for split in (s for s in SPLITS if s in shift):
        worst = shift[split].get("worst") or {}
        shown = "  ".join(f"{k} {worst[k][0]:.3f} ({worst[k][1]})" for k in ("roc_auc", "specificity") if worst.get(k))
        lines.append(f"  {'worst shift':<11} {split}: {shown or '-'}")
    lines += [f"  warning     {warning}" for warning in card.warnings]
    comparison = card.champion_comparison
    if comparison:
        lines.append(f"  registered  {'promoted' if comparison.promoted else 'not promoted'}: {comparison.reason}")
    # What the aliases say now: the last move of each alias that points at this version.
    for alias in sorted(aliases):
        moves = [m for m in reg.alias_history(registry, model_name, alias) if m.get("to") == card.version]
        last = moves[-1] if moves else {}
        since = f"since {last.get('at')}, {last.get('how')} by {last.get('by')}: {last.get('reason') or '-'}" if last else "(no recorded move)"
        lines.append(f"  {alias:<11} {since}")
    if "report.html" in card.files:
        lines.append(f"  report      {storage.join(registry, model_name, card.version, 'report.html')}")
    else:
        lines.append("  report      none (registered before reports were written)")
    return [printable(line) for line in lines]  # a --reason, a warning, a recipe name: anyone's text, no terminal escapes


# --------------------------------------------------------------------------- flow runs, as `pneumo runs` shows them
# (Prefect's FlowRun objects, read by the CLI: only their attributes are used here, Prefect is not imported)


def _when(moment: Optional[datetime]) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _state(run: Any) -> str:
    return run.state.name if run.state else "-"


def _message(run: Any, empty: str = "") -> str:
    return " ".join((run.state.message or empty).split()) if run.state else empty


def runs_lines(ran: list[tuple[str, Any]], scheduled: list[tuple[str, Any]]) -> list[str]:
    """`pneumo runs`: the runs that ran (start, flow, state, id, what each did), then apart those still scheduled."""
    lines = [f"{'started':<19}  {'flow':<14}  {'state':<9}  {'id':<36}  message"] if ran else ["no run has started yet"]
    lines += [f"{_when(run.start_time):<19}  {flow:<14}  {_state(run):<9}  {str(run.id):<36}  {_message(run)}" for flow, run in ran]
    if scheduled:
        lines += ["", f"{'scheduled for':<19}  {'flow':<14}  {'state':<9}  {'id':<36}  run name"]
        lines += [f"{_when(run.expected_start_time):<19}  {flow:<14}  {_state(run):<9}  {str(run.id):<36}  {run.name}"
                  for flow, run in scheduled]
    return [printable(line) for line in lines]  # a state message quotes paths and names: no terminal escapes


def run_lines(flow: str, run: Any, artifacts: list[Any], page: str) -> list[str]:
    """`pneumo runs show`: one run's state and message, duration, UI ``page``, and its summary artifact."""
    seconds = run.total_run_time.total_seconds() if run.total_run_time else None
    lines = [
        f"{flow} run {run.name} ({run.id})",
        f"  state      {_state(run)}" + (f" after {seconds:.0f} s" if seconds is not None else ""),
        f"  started    {_when(run.start_time)}",
        f"  message    {_message(run, '-')}",
        f"  UI         {page}",
    ]
    by_key = {artifact.key: artifact for artifact in artifacts if artifact.key}  # the latest of each key
    summary = next((by_key[key] for key in RUN_SUMMARY_KEYS if key in by_key), None)
    if summary is not None:
        lines += ["", f"{summary.key}:", *_artifact_text(summary.data).split("\n")]  # not splitlines(): it breaks at CR, VT, U+2028
    others = [key for key in by_key if summary is None or key != summary.key]
    if others:
        lines += ["", "artifacts: " + ", ".join(others)]
    return [printable(line) for line in lines]


RUN_SUMMARY_KEYS = ("run-summary", "predict-counts")  # the artifact that sums up a run of each flow


def _artifact_text(data: Any) -> str:
    """An artifact's data as terminal text: markdown as it is, a table's rows one per line."""
    if isinstance(data, str) and data.lstrip().startswith("["):
        try:
            data = json.loads(data)
        except ValueError:
            return data
    if isinstance(data, list):
        return "\n".join("  " + ", ".join(f"{key} {value}" for key, value in row.items()) for row in data)
    return str(data).rstrip()
