"""`pneumo models list|show|promote`: the registry's versions, cards and aliases as the terminal shows them."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import cyclopts
from cyclopts import Parameter

from pneumo.config import ModelLocation

Where = Annotated[ModelLocation, Parameter(name="*")]  # --workdir, --registry, --model-name
AsJson = Annotated[bool, Parameter(name="--json", negative=())]


def fail(message: str, code: int = 2) -> None:
    print(f"pneumo: {message}", file=sys.stderr)
    raise SystemExit(code)


def _aliases(registry: str, model_name: str) -> dict[str, list[str]]:
    from pneumo.registry import aliases_by_version

    return aliases_by_version(registry, model_name, lambda problem: print(f"pneumo: {problem}", file=sys.stderr))


models = cyclopts.App(name="models", help="List registered versions, show a card, move an alias.")


@models.command(name="list")
def models_list(*, where: Where = ModelLocation()) -> None:
    """Versions, oldest first, with their val/test metrics and aliases."""
    from pneumo import registry as reg
    from pneumo.summary import VERSIONS_HEADER, version_row

    registry, model_name = where.registry_uri(), where.model_name
    try:
        versions = reg.list_versions(registry, model_name)
    except ValueError as error:
        fail(str(error))
    if not versions:
        fail(f"no versions of {model_name} in {registry} (train one: pneumo run --source ...)", code=1)
    aliases = _aliases(registry, model_name)
    print(VERSIONS_HEADER)
    for version in versions:
        try:
            card = reg.verify_version(registry, model_name, version)
        except (reg.CorruptModel, FileNotFoundError) as error:  # skipped and named; the listing goes on
            print(f"pneumo: skipped {model_name} {version}: {error}", file=sys.stderr)
            continue
        print(version_row(version, card, aliases.get(version, [])))


@models.command(name="show")
def models_show(version: Annotated[str, Parameter(help="A version (v0003) or an alias (champion).")] = "champion", /, *,
                where: Where = ModelLocation(), as_json: Annotated[AsJson, Parameter(help="The whole card as JSON.")] = False) -> None:
    """Print a version's card readably (or whole, with --json)."""
    from pneumo import registry as reg
    from pneumo.summary import card_lines

    registry, model_name = where.registry_uri(), where.model_name
    try:
        card = reg.load_card(registry, model_name, version)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if as_json:
        print(json.dumps(card.as_json(), indent=2))
    else:
        print("\n".join(card_lines(card, registry, model_name, _aliases(registry, model_name).get(card.version, []))))


@models.command(name="promote")
def models_promote(version: Annotated[str, Parameter(help="The version to point the alias at, e.g. v0003.")], /, *,
                   alias: Annotated[str, Parameter(help="The alias to move.")] = "champion", where: Where = ModelLocation(),
                   reason: Annotated[str, Parameter(help="Why, kept in the alias history.")] = "") -> None:
    """Point an alias (champion by default) at a version by hand.

    The champion alias moves by the same compare-and-swap as the pipeline's promotion, so a run promoting at the same moment is never silently overwritten.
    """
    from pneumo import promotion
    from pneumo import registry as reg

    registry, model_name = where.registry_uri(), where.model_name
    try:
        state = reg.read_alias(registry, model_name, alias)  # a broken alias is repaired this way, never refused
        before = f"(broken: {state.broken})" if state.broken else state.version
        if alias == reg.CHAMPION:
            card = reg.load_card(registry, model_name, version)
            promotion.promote(registry, model_name, version, card.metrics.get("val") or {}, "roc_auc", force=True, reason=reason)
        else:
            reg.set_alias(registry, model_name, alias, version, how="by hand", reason=reason)
    except (FileNotFoundError, ValueError, KeyError) as error:
        fail(str(error))
    print(f"{model_name} {alias}: {before or '(unset)'} -> {version}")
