"""`pneumo run` (= `python flows/full.py`): pneumo.config.RunConfig from the command line (``--train.lr``,
``--transform.augment.zoom 0.9 1.1``, a few short names) over --config over the recipe, checked before Prefect loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import cyclopts
from cyclopts import Parameter

from pneumo.config import RunConfig

# The most used fields also answer to a short name (source, workdir, registry, model name are top-level already).
SHORT_NAMES = {("run", "recipe"): "--recipe", ("run", "retrain"): "--retrain",
               ("train", "epochs"): "--epochs", ("train", "seed"): "--seed"}
SECTIONS = ("run", "transform", "split", "train")


class UsageError(Exception):
    """A bad setting: one line that names the option and says how to fix it (exit code 2)."""


def _add_short_names() -> None:
    # cyclopts reads a Parameter in a field's metadata; pydantic ignores it, so the library stays CLI-free.
    for (section, name), flag in SHORT_NAMES.items():
        field = RunConfig.model_fields[section].annotation.model_fields[name]
        if not any(isinstance(meta, Parameter) for meta in field.metadata):
            field.metadata.append(Parameter(alias=flag))


_add_short_names()


def flag_of(loc: tuple) -> str:
    """The option of a field's path: its short name, or its dotted name."""
    path = tuple(str(part) for part in loc if not isinstance(part, int))
    return SHORT_NAMES.get(path) or "--" + ".".join(path).replace("_", "-")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML or YAML file, each value of its field's own type; refused in one line."""
    from pydantic import ValidationError

    from pneumo.config import read_settings_file

    try:
        return read_settings_file(path)
    except ValidationError as error:
        raise UsageError(error_line(error)) from None
    except ValueError as error:
        raise UsageError(f"--config {path}: {error}") from None


def use_config_file(app: cyclopts.App, tokens: list[str]) -> None:
    """Values of ``--config FILE`` fill what the command line leaves unset (cyclopts' config hook)."""
    app.config = []
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens) or token.startswith("--config="):
            path = Path(token.split("=", 1)[1] if "=" in token else tokens[i + 1]).expanduser()
            app.config = [cyclopts.config.Dict({"run": read_config_file(path)}, source=str(path))]


def run(
    *,
    config: Annotated[RunConfig, Parameter(name="*")] = RunConfig(),
    config_file: Annotated[Optional[Path], Parameter(
        name="--config", help="TOML (or YAML) file of settings (source = ..., workdir = ..., tables [run], [transform], [split], [train]); the command line wins")] = None,
    print_config: Annotated[bool, Parameter(negative=(), help="Print the resolved settings as JSON and exit")] = False,
    verbose: Annotated[bool, Parameter(name=["--verbose", "-v"], negative=(),
                                       help="Show tracebacks on the terminal too (they always go to the Prefect log)")] = False,
) -> int:
    """Download the chest X-rays, size them, shard them, then train, evaluate and register a TinyNet.

    Values come from the recipe (--recipe), then --config FILE, then the command line.
    """
    if print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    check(config)
    from cli import runtime

    runtime.stop_on_interrupt()  # first: a Ctrl-C while Prefect loads is one line, no traceback, too
    from flows.full import full
    from pneumo.summary import run_text

    return runtime.run_flow(full, dict(config), lambda summary, seconds: print(run_text(summary, seconds)), verbose=verbose)


# --------------------------------------------------------------------------- checks before any service starts


def check(config: RunConfig) -> None:
    """Refuse, as UsageError, what the run would only discover later; contacts each S3 bucket once."""
    from pneumo import signatures, storage

    if problem := signatures.key_problem():  # said now: Prefect would only log it, then run uncached
        raise UsageError(problem)
    run = config.run  # the model name was checked by ModelLocation, where it is declared
    if run.dask_address and run.runner != "dask":
        raise UsageError(f"--run.dask-address {run.dask_address}: only used with --run.runner dask; add it or drop this")
    _check_source(config.source)
    buckets = set()
    for flag, uri in (("--workdir", config.workdir), ("--registry", config.registry)):
        if uri and not (storage.is_s3(uri) and storage.split_s3(uri)[0] in buckets):
            buckets.add(storage.split_s3(uri)[0] if storage.is_s3(uri) else None)
            _usable(flag, uri)


def _usable(flag: str, uri: str) -> None:
    from pneumo import storage

    try:
        storage.check_usable(uri)
    except ValueError as error:
        raise UsageError(f"{flag} {uri}: {error}") from None


def _check_source(source: str) -> None:
    from pneumo import download

    try:
        parsed = download.check_source(source)
    except ValueError as error:
        raise UsageError(f"--source {source}: {error}") from None
    if parsed.kind in ("s3_zip", "s3_prefix"):
        _usable("--source", parsed.location)


def error_line(error: Exception) -> str:
    """One line for a refused command line: the option, the value, what is wrong."""
    from pydantic import ValidationError

    cause = error.__cause__ if isinstance(error.__cause__, ValidationError) else error
    if isinstance(cause, ValidationError):
        first = cause.errors()[0]
        loc = tuple(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        section = len(loc) == 1 and loc[0] in SECTIONS  # a combination of the section's values, not one field
        where = f"{loc[0]} settings" if section else flag_of(loc)
        value = first.get("input")
        shown = f" {cut(str(value))}" if not section and isinstance(value, (str, int, float)) else ""
        return f"{where}{shown}: {message[0].lower()}{message[1:]}; see `pneumo run --help`"
    return " ".join(cut(word, 200) for word in str(error).split())


def cut(text: str, limit: int = 40) -> str:
    """``text``, or its first ``limit`` characters and how many there were: a value echoed in an error stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
