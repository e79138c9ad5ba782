"""The ``pneumo`` command: run the pipeline, score X-rays, serve a model, manage versions.

    pneumo run --source DIR_ZIP_S3_OR_KAGGLE      train and register (python flows/full.py)
    pneumo predict IMAGE_OR_FOLDER...             score images with the champion
    pneumo serve                                  HTTP endpoint that follows the champion
    pneumo models list | show V | promote V       what the registry holds
    pneumo runs [show last|ID]                    what the recent runs did (Prefect API)
    pneumo gc [--yes]                             what the workdir can lose, and removing it

Only ``run`` and ``runs`` import Prefect: the other commands start in about a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from flows import settings
from flows.server_cli import server_app
from pneumo.evaluate import format_metric

if TYPE_CHECKING:
    from pneumo.registry import Card

DEFAULT_REGISTRY = "./pneumo-data/registry"  # {workdir}/registry of `pneumo run`'s default workdir
SHUTDOWN_SECONDS = 0.5  # pneumo serve: the most a request may delay the exit after SIGTERM

app = typer.Typer(
    help="Chest X-rays in, a 2,541-parameter pneumonia classifier out: train it, score with it, serve it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List registered versions, show a card, move an alias.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(server_app, name="server")

RegistryOption = Annotated[
    str, typer.Option("--registry", envvar="PNEUMO_REGISTRY", help="Model registry: a folder or an s3:// prefix.")
]
ModelNameOption = Annotated[str, typer.Option("--model-name", help="Registered model name.")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"pneumo: {message}", err=True)
    raise typer.Exit(code)


def _start_run(checked: settings.Settings) -> None:
    from flows import runtime

    runtime.stop_on_interrupt()  # Ctrl-C: stop, say what is cached, exit 130 (flows/runtime.py)
    from flows import full  # Prefect is imported here only

    runtime.exit_process(full.run(checked))


# The options are generated from the settings models (flows/settings.py), as for `python flows/full.py`.
app.command("run")(settings.run_command(_start_run))


def _load_predictor(registry: str, model_name: str, alias: Optional[str], version: Optional[str], **kwargs):
    from pneumo import predict

    if alias and version:
        _fail("give --alias or --version, not both")
    try:
        return predict.Predictor.from_registry(registry, model_name, alias=alias or "champion", version=version, **kwargs)
    except (predict.CardError, predict.ModelNotFound, ValueError) as error:
        _fail(str(error))


@app.command()
def predict(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="Images, or folders of images (read recursively).", show_default=False)],
    registry: RegistryOption = DEFAULT_REGISTRY,
    model_name: ModelNameOption = "tinynet",
    alias: Annotated[str, typer.Option(help="Alias to load (unless --version is given).")] = "champion",
    version: Annotated[Optional[str], typer.Option(help="Version to load, e.g. v0003, instead of an alias.", show_default="none")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
) -> None:
    """Score X-rays: label, PNEUMONIA probability and warnings, one line per image.

    Exit code 0 when every input was scored, 1 when some could not be (each with its reason), 2 on bad usage.
    """
    from pneumo.predict import list_inputs

    paths: list[str] = []
    for item in inputs:
        if item.is_dir():
            paths += [image.path for image in list_inputs(item)]
        else:
            paths.append(str(item))  # a missing file is reported per input
    if not paths:
        _fail("no files found in " + ", ".join(map(str, inputs)))
    alias_given = ctx.get_parameter_source("alias").name == "COMMANDLINE"  # an enum of Typer's own click
    predictor = _load_predictor(registry, model_name, alias if alias_given or not version else None, version)
    results = predictor.predict(paths)
    failed = [p for p in results if not p.ok]
    if as_json:
        for p in results:
            typer.echo(json.dumps(p.to_dict()))
    else:
        width = max(len(p.input) for p in results)
        typer.echo(f"{'image':<{width}}  {'label':<9}  probability  warnings")
        for p in results:
            if p.ok:
                typer.echo(f"{p.input:<{width}}  {p.label:<9}  {p.probability:11.4f}  {'; '.join(p.warnings)}".rstrip())
            else:
                typer.echo(f"{p.input:<{width}}  {'-':<9}  {'-':>11}  error: {p.error}")
    for p in failed:
        typer.echo(f"pneumo: cannot score {p.input}: {p.error}", err=True)
    typer.echo(
        f"{model_name} {predictor.version} (threshold {predictor.threshold:.4g}, {predictor.runtime}): "
        f"{len(results) - len(failed)} scored, {len(failed)} failed",
        err=True,
    )
    raise typer.Exit(1 if failed else 0)


@app.command()
def serve(
    registry: RegistryOption = DEFAULT_REGISTRY,
    model_name: ModelNameOption = "tinynet",
    alias: Annotated[str, typer.Option(help="Alias to serve; the server follows it when it moves.")] = "champion",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    poll: Annotated[float, typer.Option(help="Seconds between checks of where the alias points.", min=0.1)] = 60.0,
    max_bytes: Annotated[int, typer.Option(help="Largest upload accepted, per image.", min=1)] = 20_000_000,
    max_pixels: Annotated[int, typer.Option(help="Largest image accepted, in pixels.", min=1)] = 50_000_000,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request body may take to arrive (then 408).", min=0.1)] = 30.0,
    max_connections: Annotated[int, typer.Option(help="Open connections and requests at once; more get 503.", min=1)] = 100,
    decode_memory: Annotated[Optional[int], typer.Option(
        help="MB of image decoding in flight across requests [default: a quarter of RAM, 256 to 2048].", min=1,
        show_default=False)] = None,
) -> None:
    """Serve the model over HTTP: POST /predict, POST /predict/batch, GET /health, GET /model.

    No TLS and no authentication: exposed beyond this machine (--host), put it behind a reverse
    proxy that terminates TLS, authenticates and times out slow clients (see the README).
    """
    import uvicorn

    from pneumo import serve as serving

    predictor = _load_predictor(registry, model_name, alias, None, max_pixels=max_pixels)
    api = serving.create_app(
        registry, model_name, alias, poll_seconds=poll, max_bytes=max_bytes, max_pixels=max_pixels,
        body_seconds=body_timeout, decode_memory=decode_memory * 2**20 if decode_memory else None, predictor=predictor,
    )
    request_log = logging.getLogger("pneumo.serve")  # one line per request (pneumo.serve's middleware)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    typer.echo(
        f"pneumo: serving {model_name} {predictor.version} ({alias}, {predictor.runtime}) on http://{host}:{port}; "
        f"API docs at http://{host}:{port}/docs",
        err=True,
    )
    # A stalled upload must not hold the process after SIGTERM: requests still running
    # half a second after it are cancelled.
    uvicorn.run(
        api, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        limit_concurrency=max_connections, timeout_keep_alive=5,
    )


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
                typer.echo(f"pneumo: alias {uri} is unreadable: {error}", err=True)
                continue
            by_version.setdefault(target, []).append(name[: -len(".json")])
    return by_version


def _metric(card: Card, split: str, name: str) -> str:
    value = (card.metrics.get(split) or {}).get(name)
    return "-" if value is None else format_metric(value)


@models_app.command("list")
def models_list(registry: RegistryOption = DEFAULT_REGISTRY, model_name: ModelNameOption = "tinynet") -> None:
    """Versions, oldest first, with their val/test metrics and aliases."""
    from pneumo import registry as reg

    try:
        versions = reg.list_versions(registry, model_name)
    except ValueError as error:
        _fail(str(error))
    if not versions:
        _fail(f"no versions of {model_name} in {registry} (train one: pneumo run --source ...)", code=1)
    aliases = _aliases(registry, model_name)
    typer.echo(f"{'version':<8} {'created':<25} {'val AUC':>7} {'val acc':>7} {'test AUC':>8} {'test acc':>8}  aliases")
    for version in versions:
        try:
            card = reg.verify_version(registry, model_name, version)
        except (reg.CorruptModel, FileNotFoundError) as error:  # skipped and named; the listing goes on
            typer.echo(f"pneumo: skipped {model_name} {version}: {error}", err=True)
            continue
        typer.echo(
            f"{version:<8} {card.created_at:<25} {_metric(card, 'val', 'roc_auc'):>7} "
            f"{_metric(card, 'val', 'accuracy'):>7} {_metric(card, 'test', 'roc_auc'):>8} "
            f"{_metric(card, 'test', 'accuracy'):>8}  {', '.join(sorted(aliases.get(version, [])))}".rstrip()
        )


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="A version (v0003) or an alias (champion).")] = "champion",
    registry: RegistryOption = DEFAULT_REGISTRY,
    model_name: ModelNameOption = "tinynet",
    as_json: Annotated[bool, typer.Option("--json", help="The whole card as JSON.")] = False,
) -> None:
    """Print a version's card readably (or whole, with --json)."""
    from pneumo import registry as reg

    try:
        card = reg.load_card(registry, model_name, version)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(card.as_json(), indent=2))
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
    typer.echo("\n".join(lines))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version to point the alias at, e.g. v0003.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
    registry: RegistryOption = DEFAULT_REGISTRY,
    model_name: ModelNameOption = "tinynet",
    reason: Annotated[str, typer.Option(help="Why, kept in the alias history.")] = "",
) -> None:
    """Point an alias (champion by default) at a version by hand.

    The champion alias moves by the same compare-and-swap as the pipeline's promotion, so a run promoting at the same moment is never silently overwritten.
    """
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
        _fail(str(error))
    typer.echo(f"{model_name} {alias}: {before or '(unset)'} -> {version}")


runs_app = typer.Typer(help="Recent runs of the pneumo flows, with what each did (from PREFECT_API_URL, or else the local server).")
app.add_typer(runs_app, name="runs")


@runs_app.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many runs to list, newest first.", min=1)] = 10,
) -> None:
    """List recent runs of pneumo-full and pneumo-predict with their state messages; `pneumo runs show last` for one."""
    if ctx.invoked_subcommand:
        return
    from flows import runs

    try:
        with runs.prefect_api():
            found = runs.recent(limit)
            if not found:
                _fail(f"no runs of {', '.join(runs.FLOWS)} on {runs.api_url()} yet", code=1)
            lines = runs.list_lines(found)
    except runs.RunsError as error:
        _fail(str(error))
    typer.echo("\n".join(lines))


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="'last' (the newest run), or a flow-run id from `pneumo runs`.")] = "last",
) -> None:
    """One run: state and message, duration, UI link, and its summary (version, metrics, files)."""
    from flows import runs

    try:
        with runs.prefect_api():
            flow, flow_run, artifacts = runs.find(run)
            lines = runs.show_lines(flow, flow_run, artifacts)
    except runs.RunsError as error:
        _fail(str(error))
    typer.echo("\n".join(lines))


@app.command()
def gc(
    workdir: Annotated[str, typer.Option(help="The workdir to clean: a folder or an s3:// prefix.")] = "./pneumo-data",
    registry: Annotated[
        Optional[str], typer.Option(help="Model registry whose versions' inputs are kept \\[default: WORKDIR/registry].", show_default=False)
    ] = None,
    keep_recent: Annotated[str, typer.Option(help="Keep what was modified, or used by a run that ended, this recently: 30m, 24h, 7d, 0.")] = "24h",
    only_aliased: Annotated[bool, typer.Option("--only-aliased", help="Keep the inputs of aliased versions only (champion, latest, ...), not of every version.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Remove what is listed as removable; without it nothing is removed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The plan as JSON.")] = False,
) -> None:
    """List what no registered version, alias or recent run needs (shards, manifests, stats, reports,
    downloads, predictions), with sizes; remove it with --yes.

    Never touched: the registry, Prefect's results, and anything at all while a run is running in the workdir.
    """
    from pneumo import cleanup

    try:
        plan = cleanup.plan(workdir, registry, keep_recent=cleanup.parse_duration(keep_recent), only_aliased=only_aliased)
    except ValueError as error:
        _fail(str(error))
    if as_json:
        typer.echo(cleanup.to_json(plan))
    else:
        typer.echo(f"pneumo gc: {plan.workdir}")
        typer.echo("\n".join(cleanup.describe(plan)))
    if plan.running:
        typer.echo(f"pneumo: {len(plan.running)} run(s) in progress in this workdir: nothing can be removed now", err=True)
    if not yes:
        if plan.removable:
            typer.echo("nothing removed: add --yes to remove the items marked remove", err=True)
        return
    try:
        freed = cleanup.remove(plan)
    except cleanup.RunInProgress as error:
        _fail(str(error), code=1)
    typer.echo(f"removed {len(plan.removable)} item(s), {cleanup.human_bytes(freed)} freed", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
