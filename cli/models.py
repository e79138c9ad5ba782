"""`pneumo models list|show|promote`: the registry's versions, cards and aliases as the terminal shows them."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import cyclopts
from cyclopts import Parameter

from pneumo.config import ModelLocation
from pneumo.evaluate import format_metric

if TYPE_CHECKING:
    from pneumo.registry import Card

Where = Annotated[ModelLocation, Parameter(name="*")]  # --workdir, --registry, --model-name
AsJson = Annotated[bool, Parameter(name="--json", negative=())]


def fail(message: str, code: int = 2) -> None:
    print(f"pneumo: {message}", file=sys.stderr)
    raise SystemExit(code)


def _echo(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout)


def _aliases(registry: str, model_name: str) -> dict[str, list[str]]:
    """version -> the aliases pointing at it."""
    from pneumo import storage

    by_version: dict[str, list[str]] = {}
    for uri in storage.list_uris(storage.join(registry, model_name, "aliases")):
        name = uri.replace("\\", "/").rsplit("/", 1)[-1]
        if name.endswith(".json"):
            try:
                target = storage.read_json(uri).get("version")
            except (ValueError, AttributeError) as error:  # a damaged pointer: named, the listing goes on
                _echo(f"pneumo: alias {uri} is unreadable: {error}", err=True)
                continue
            by_version.setdefault(target, []).append(name[: -len(".json")])
    return by_version


def _metric(card: Card, split: str, name: str) -> str:
    value = (card.metrics.get(split) or {}).get(name)
    return "-" if value is None else format_metric(value)


def list_versions(registry: str, model_name: str) -> None:
    """Versions, oldest first, with their val/test metrics and aliases."""
    from pneumo import registry as reg

    try:
        versions = reg.list_versions(registry, model_name)
    except ValueError as error:
        fail(str(error))
    if not versions:
        fail(f"no versions of {model_name} in {registry} (train one: pneumo run --source ...)", code=1)
    aliases = _aliases(registry, model_name)
    _echo(f"{'version':<8} {'created':<25} {'val AUC':>7} {'val acc':>7} {'test AUC':>8} {'test acc':>8}  aliases")
    for version in versions:
        try:
            card = reg.verify_version(registry, model_name, version)
        except (reg.CorruptModel, FileNotFoundError) as error:  # skipped and named; the listing goes on
            _echo(f"pneumo: skipped {model_name} {version}: {error}", err=True)
            continue
        _echo(
            f"{version:<8} {card.created_at:<25} {_metric(card, 'val', 'roc_auc'):>7} "
            f"{_metric(card, 'val', 'accuracy'):>7} {_metric(card, 'test', 'roc_auc'):>8} "
            f"{_metric(card, 'test', 'accuracy'):>8}  {', '.join(sorted(aliases.get(version, [])))}".rstrip()
        )


def show(registry: str, model_name: str, version: str, as_json: bool) -> None:
    """A version's card, readably (or whole, with ``as_json``)."""
    from pneumo import registry as reg

    try:
        card = reg.load_card(registry, model_name, version)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if as_json:
        _echo(json.dumps(card.as_json(), indent=2))
        return
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
            f"{k} {_metric(card, split, k)}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if ci.get(k) else "")
            for k in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
        )
        lines.append(f"  {split:<11} n={m.get('n', '-')}  {shown}")
    if any((card.metrics.get(split) or {}).get("ci95") for split in ("val", "test")):
        lines.append("              [95% bootstrap interval, resampled by patient]")
    shift = card.metrics.get("shift") or {}
    for split in (s for s in ("val", "test") if s in shift):
        worst = shift[split].get("worst") or {}
        shown = "  ".join(f"{k} {worst[k][0]:.3f} ({worst[k][1]})" for k in ("roc_auc", "specificity") if worst.get(k))
        lines.append(f"  {'worst shift':<11} {split}: {shown or '-'}")
    lines += [f"  warning     {warning}" for warning in card.warnings]
    comparison = card.champion_comparison
    if comparison:
        lines.append(f"  registered  {'promoted' if comparison.promoted else 'not promoted'}: {comparison.reason}")
    # What the aliases say now: the last move of each alias that points at this version.
    for alias in sorted(_aliases(registry, model_name).get(card.version, [])):
        moves = [m for m in reg.alias_history(registry, model_name, alias) if m.get("to") == card.version]
        last = moves[-1] if moves else {}
        since = f"since {last.get('at')}, {last.get('how')} by {last.get('by')}: {last.get('reason') or '-'}" if last else "(no recorded move)"
        lines.append(f"  {alias:<11} {since}")
    if "report.html" in card.files:
        from pneumo import storage

        lines.append(f"  report      {storage.join(registry, model_name, card.version, 'report.html')}")
    else:
        lines.append("  report      none (registered before reports were written)")
    _echo("\n".join(lines))


def promote(registry: str, model_name: str, version: str, alias: str, reason: str) -> None:
    """Point ``alias`` at ``version`` by hand; champion by compare-and-swap."""
    from pneumo import promotion
    from pneumo import registry as reg

    try:
        try:
            before = reg.get_alias(registry, model_name, alias)
        except reg.BrokenAlias as error:  # promoting by hand is how a broken alias is repaired
            before = f"(broken: {error})"
        if alias == reg.CHAMPION:
            card = reg.load_card(registry, model_name, version)
            promotion.promote(registry, model_name, version, card.metrics["val"], "roc_auc", force=True, reason=reason)
        else:
            reg.set_alias(registry, model_name, alias, version, how="by hand", reason=reason)
    except (FileNotFoundError, ValueError, KeyError) as error:
        fail(str(error))
    _echo(f"{model_name} {alias}: {before or '(unset)'} -> {version}")


models = cyclopts.App(name="models", help="List registered versions, show a card, move an alias.")


@models.command(name="list")
def models_list(*, where: Where = ModelLocation()) -> None:
    """Versions, oldest first, with their val/test metrics and aliases."""
    list_versions(where.registry_uri(), where.model_name)


@models.command(name="show")
def models_show(version: Annotated[str, Parameter(help="A version (v0003) or an alias (champion).")] = "champion", /, *,
                where: Where = ModelLocation(), as_json: Annotated[AsJson, Parameter(help="The whole card as JSON.")] = False) -> None:
    """Print a version's card readably (or whole, with --json)."""
    show(where.registry_uri(), where.model_name, version, as_json)


@models.command(name="promote")
def models_promote(version: Annotated[str, Parameter(help="The version to point the alias at, e.g. v0003.")], /, *,
                   alias: Annotated[str, Parameter(help="The alias to move.")] = "champion", where: Where = ModelLocation(),
                   reason: Annotated[str, Parameter(help="Why, kept in the alias history.")] = "") -> None:
    """Point an alias (champion by default) at a version by hand.

    The champion alias moves by the same compare-and-swap as the pipeline's promotion, so a run promoting at the same moment is never silently overwritten.
    """
    promote(where.registry_uri(), where.model_name, version, alias, reason)
