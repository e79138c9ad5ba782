"""The settings of `pneumo run` (= `python flows/full.py`), each declared once, and their checks.

The command-line options are generated from pydantic models: ``RunSettings`` (the flow's own
parameters, which ``flows.full.full`` takes its defaults and checks from) and the config models
(TrainConfig, TransformConfig with its AugmentConfig, SplitConfig). A value comes, by
rising priority, from the model's default, the recipe (pneumo.recipes), ``--config FILE``
(TOML, or YAML when PyYAML is installed), then the command line.

``check`` then refuses every bad value a run could only discover later (source, ranges,
workdir, buckets, model name) in about a second, before the Prefect server or the process
pool starts. No Prefect import here: a refusal must not wait for it.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import sys
import types
import typing
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pneumo.config import KAGGLE_DEFAULT_SOURCE, SplitConfig, TrainConfig, TransformConfig
from pneumo.recipes import DEFAULT_RECIPE, RECIPES, RecipeName
from pneumo.names import DEFAULT_CHAMPION_METRIC, ChampionMetric, validate_model_name

Runner = Literal["threads", "processes", "dask"]


class UsageError(Exception):
    """A bad setting: one line that names the option and says how to fix it (exit code 2)."""


class RunSettings(BaseModel):
    """The flow's own parameters: flows.full.full takes its defaults from here and validates its values here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        KAGGLE_DEFAULT_SOURCE,
        description="A folder in the Kaggle layout (train/NORMAL, train/PNEUMONIA, ...), a .zip of it, "
        "s3://bucket/archive.zip, s3://bucket/prefix, or kaggle:OWNER/DATASET (needs Kaggle credentials)",
    )
    workdir: str = Field("./pneumo-data", description="Root for downloads, stats, shards, registry and Prefect results (local path or s3://)")
    registry: Optional[str] = Field(None, description="Model registry root, a folder or s3:// prefix")
    model_name: str = Field("tinynet", description="Name the model is registered under")
    recipe: RecipeName = Field(
        DEFAULT_RECIPE,
        description="Transform and training preset: 'seed' is the faithful port of the seed, 'robust' adds shape "
        "features, augmented renditions and class-weighted BCE, 'robust2' trains it on renditions that "
        "also change the aspect ratio and blur, averages its weights and chooses its threshold on the stress val, "
        "'robust3' (the default) does the same on films whose flat border bars are cut; "
        "the options below override its values",
    )
    percentile: float = Field(75.0, gt=0, lt=100, description="Image-size percentile that sets the resize target")
    shard_size: int = Field(1000, ge=1, description="Images per HDF5 shard")
    champion_metric: ChampionMetric = Field(
        DEFAULT_CHAMPION_METRIC,
        description="Metric a new version must beat (strictly) to become champion: stress_roc_auc is the ROC AUC on the "
        "stress val (val under random strong jitters, on which the champion is re-scored too); the others are clean val's",
    )
    retrain: bool = Field(False, description="Train and register a new version even when data, config and code are unchanged")
    retries: int = Field(
        3, ge=0, le=20,
        description="Retries per task for errors a retry can fix (network, S3 throttling, a dead worker), with "
        "exponential backoff; other errors fail at once",
    )
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="Fail the run when more than this fraction of the input files is quarantined")
    verify_source: bool = Field(
        False,
        description="Fingerprint a local source by the sha256 of every file instead of sizes and mtimes "
        "(reads every byte)",
    )
    runner: Runner = Field(
        "processes",
        description="Where the shard tasks transform images: 'processes' hands the pixel work to a local pool of "
        "worker processes, 'threads' does it in the tasks' threads, 'dask' runs the tasks on Dask workers",
    )
    workers: Optional[int] = Field(None, ge=1, description="Parallel shard tasks, and processes or Dask workers")
    dask_address: Optional[str] = Field(None, description="Scheduler of an existing Dask cluster, e.g. tcp://host:8786 (with --runner dask)")


RUN_DEFAULTS = RunSettings()

# Sections of the settings, in --help's order: each model's fields become options.
SECTIONS: dict[str, type[BaseModel]] = {"run": RunSettings, "train": TrainConfig, "transform": TransformConfig, "split": SplitConfig}
# The pipeline sets these itself (size from --percentile).
SKIPPED = {("transform", "size")}
# Option names that differ from the field's (kept from the earlier CLI).
NAMES = {("transform", "method"): "transform"}


class Option(typing.NamedTuple):
    path: tuple[str, ...]  # ("train", "epochs"), ("transform", "augment", "zoom"), ("run", "source")
    flag: str  # "--epochs"
    annotation: Any
    description: str


def _options() -> list[Option]:
    """One option per field of every section (nested models flattened with their field name as prefix)."""
    options: list[Option] = []

    def walk(model: type[BaseModel], path: tuple[str, ...], prefix: str) -> None:
        for name, field in model.model_fields.items():
            here = (*path, name)
            if here in SKIPPED:
                continue
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, here, f"{prefix}{name}-")
                continue
            flag = "--" + NAMES.get(here, prefix + name).replace("_", "-")
            options.append(Option(here, flag, field.annotation, field.description or ""))

    for section, model in SECTIONS.items():
        walk(model, (section,), "")
    flags = [option.flag for option in options]
    assert len(flags) == len(set(flags)), f"two settings map to one option: {sorted(flags)}"
    return options


OPTIONS = _options()
BY_FLAG = {option.flag: option for option in OPTIONS}


def unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _value_at(config: BaseModel, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return "none" if value is None else str(value)


# Defaults that are not a value: what an unset option means.
UNSET_MEANS = {
    ("run", "registry"): "WORKDIR/registry",
    ("run", "workers"): "CPU count",
    ("run", "dask_address"): "none: a local cluster",
}


def default_of(option: Option) -> Any:
    """The value an option takes when it is not given: the default recipe's (or the model's) value."""
    section, rest = option.path[0], option.path[1:]
    if section == "run":
        return _value_at(RUN_DEFAULTS, rest)
    if section == "split":
        return _value_at(SplitConfig(), rest)
    return _value_at(getattr(RECIPES[DEFAULT_RECIPE], section), rest)


def recipe_note(option: Option) -> str:
    """'(recipe seed: 1000)' when another recipe has another default for this option."""
    section, rest = option.path[0], option.path[1:]
    if section not in ("train", "transform"):
        return ""
    default = _shown(default_of(option))
    others = [f"{name}: {_shown(_value_at(getattr(recipe, section), rest))}" for name, recipe in RECIPES.items()
              if name != DEFAULT_RECIPE and _shown(_value_at(getattr(recipe, section), rest)) != default]
    return f" (recipe {', '.join(others)})" if others else ""


def default_text(option: Option) -> str:
    """The default as --help shows it: the default recipe's value, and the other recipes' when different."""
    shown = UNSET_MEANS.get(option.path) or _shown(default_of(option))
    return f"default: {shown}{recipe_note(option)}"


# --------------------------------------------------------------------------- the command line (Typer)

# --help's panels, one per settings model.
PANELS = {"run": "Pipeline (RunSettings)", "train": "Training (TrainConfig)",
          "transform": "Transform (TransformConfig, AugmentConfig)", "split": "Splits (SplitConfig)"}
_CHOICES: dict[tuple[str, ...], type[enum.Enum]] = {}
METAVARS = {("transform", "grid"): "ROWS COLS", ("transform", "augment", "zoom"): "LOW HIGH", ("transform", "pooling"): "<max|mean>"}


def _choice(values: tuple[str, ...]) -> type[enum.Enum]:
    """Typer reads choices from an Enum; one per set of Literal values."""
    if values not in _CHOICES:
        _CHOICES[values] = enum.Enum("Choice", {value: value for value in values}, type=str)
    return _CHOICES[values]


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses a value as; pydantic then validates it."""
    annotation = unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return _choice(typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:  # any length: the option is repeated
            return list[_cli_type(args[0])]  # type: ignore[misc]
        return tuple[tuple(_cli_type(arg) for arg in args)]  # type: ignore[misc]
    if annotation in (bool, int, float, str):
        return annotation
    raise TypeError(f"no command-line form for {annotation!r}")


def _cli_default(option: Option) -> Any:
    value = default_of(option)
    cli_type = _cli_type(option.annotation)
    if value is None:
        return None
    if isinstance(cli_type, type) and issubclass(cli_type, enum.Enum):
        return cli_type(value)
    if typing.get_origin(cli_type) is list:
        item = typing.get_args(cli_type)[0]
        return [item(v) if isinstance(item, type) and issubclass(item, enum.Enum) else v for v in value]
    return value


def both_ways(option: Option) -> bool:
    """Whether a yes/no setting takes both flags (--trim-padding/--no-trim-padding): recipes differ on it."""
    return unwrap_optional(option.annotation) is bool and bool(recipe_note(option))


def flag_of(option: Option) -> str:
    """The option as typed: its flag, or for a setting that is on by default, the flag that turns it off
    (a setting on which recipes differ has both)."""
    if unwrap_optional(option.annotation) is bool and default_of(option) and not both_ways(option):
        return f"--no-{option.flag[2:]}"
    return option.flag


def parameter_name(option: Option) -> str:
    return flag_of(option)[2:].replace("-", "_")


def command_parameters() -> list[inspect.Parameter]:
    """The parameters of `pneumo run` (= `python flows/full.py`), one per setting, for Typer to read.

    Each shows the default recipe's value as its default; only values given on the command
    line count (click's parameter source), so the recipe and --config supply the rest.
    """
    import typer

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("config", keyword, default=None, annotation=Annotated[Optional[Path], typer.Option(
            "--config", metavar="FILE", show_default="none", dir_okay=False,
            help="TOML (or YAML) file of settings: top-level keys named as the options (epochs, shard_size, ...) "
                 "or tables run, train, transform, split; the command line wins")]),
        inspect.Parameter("print_config", keyword, default=False, annotation=Annotated[bool, typer.Option(
            "--print-config", help="Print the effective settings as JSON and exit")]),
        inspect.Parameter("verbose", keyword, default=False, annotation=Annotated[bool, typer.Option(
            "--verbose", help="Show tracebacks on the terminal too (they always go to the Prefect log)")]),
    ]
    for option in OPTIONS:
        cli_type = _cli_type(option.annotation)
        help_text = option.description.rstrip(".")
        metavar = METAVARS.get(option.path)
        if isinstance(cli_type, type) and issubclass(cli_type, enum.Enum):
            choices = [choice.value for choice in cli_type]
            if len("|".join(choices)) > 16:  # a short metavar keeps --help's columns narrow
                metavar = option.path[-1].split("_")[-1].upper()
                if not all(f"'{choice}'" in help_text for choice in choices):
                    help_text += f" (one of {', '.join(choices)})"
        default = _cli_default(option)
        if cli_type is bool and both_ways(option):  # --trim-padding, and --no-trim-padding (hidden: --help's columns stay narrow)
            shown = "on" if default_of(option) else "off"
            info = typer.Option(option.flag, rich_help_panel=PANELS[option.path[0]], help=(
                f"{help_text[0].upper()}{help_text[1:]}{recipe_note(option)}; --no-{option.flag[2:]} turns it off \\[default: {shown}]"))
            parameters.append(inspect.Parameter(parameter_name(option), keyword, default=False, annotation=Annotated[bool, info]))
            info = typer.Option(f"--no-{option.flag[2:]}", hidden=True)
            parameters.append(inspect.Parameter(f"no_{parameter_name(option)}", keyword, default=False, annotation=Annotated[bool, info]))
            continue
        if cli_type is bool:  # a flag that turns the default over: --retrain, --no-shift-suite
            if default_of(option):
                help_text = f"Turn off what is on by default: {help_text[0].lower()}{help_text[1:]}"
            info = typer.Option(flag_of(option), help=f"{help_text}{recipe_note(option)}", rich_help_panel=PANELS[option.path[0]])
            parameters.append(inspect.Parameter(parameter_name(option), keyword, default=False, annotation=Annotated[bool, info]))
            continue
        unset = UNSET_MEANS.get(option.path)
        info = typer.Option(option.flag, help=f"{help_text[0].upper()}{help_text[1:]}{recipe_note(option)}",
                            rich_help_panel=PANELS[option.path[0]], show_default=unset if unset else True, metavar=metavar)
        parameters.append(inspect.Parameter(parameter_name(option), keyword, default=default,
                                            annotation=Annotated[Optional[cli_type], info]))
    return parameters


RUN_HELP = (
    "Run the pneumo pipeline: download the chest X-ray dataset, compute image-size percentiles, transform the images "
    "into HDF5 shards, then train, evaluate and register a 2,541-parameter TinyNet. Every option can also be given "
    "in --config FILE; the command line wins."
)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return value


def run_command(start: Callable[[Settings], None]) -> Callable[..., None]:
    """The function of `pneumo run` and `python flows/full.py`: check the settings, then ``start`` the run."""

    def run(ctx: Any, **values: Any) -> None:
        checked = load(ctx, values, prog=ctx.command_path)  # exits 2 on a bad value
        if checked is not None:  # None: --print-config printed them
            start(checked)

    run.__signature__ = inspect.Signature(command_parameters())  # type: ignore[attr-defined]
    run.__annotations__ = {}  # Typer reads the signature's annotations, not these strings
    run.__doc__ = RUN_HELP
    return run


def run_app(start: Callable[[Settings], None]) -> Any:
    """`python flows/full.py`: the run command as a Typer app of its own."""
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(run_command(start))
    return app


def parse(argv: list[str], prog: str = "pneumo run") -> Optional[Settings]:
    """The settings the run command would take from ``argv`` (None after --print-config), parsed by
    the command itself; for scripts and tests. Raises UsageError for a bad value."""
    import typer

    ctx = typer.main.get_command(run_app(print)).make_context(prog, list(argv))
    return from_command(ctx, ctx.params)


def _typed(ctx: Any, name: str) -> bool:
    """Whether the parameter ``name`` was given on the command line (click's parameter source)."""
    source = ctx.get_parameter_source(name)  # an enum of Typer's own click
    return source is not None and source.name == "COMMANDLINE"


def from_command(ctx: Any, values: dict[str, Any]) -> Optional[Settings]:
    """Settings from the command's values (only those given on the command line) and --config;
    None after --print-config printed them. Raises UsageError."""
    given = _read_config_file(str(values["config"])) if values.get("config") else {}
    for option in OPTIONS:
        name = parameter_name(option)
        if both_ways(option):  # --trim-padding or --no-trim-padding
            typed = [value for value, flag in ((True, name), (False, f"no_{name}")) if _typed(ctx, flag)]
            if len(typed) > 1:
                raise UsageError(f"{option.flag} and --no-{option.flag[2:]} contradict each other: give one")
            if typed:
                given[option.path] = typed[0]
            continue
        if _typed(ctx, name):
            flag = unwrap_optional(option.annotation) is bool
            given[option.path] = (not default_of(option)) if flag else _plain(values[name])
    settings = resolve(given, verbose=bool(values.get("verbose")))
    if values.get("print_config"):
        print(json.dumps(settings.to_dict(), indent=2))
        return None
    return settings


class Settings(typing.NamedTuple):
    """The effective settings of one run."""

    run: RunSettings
    transform: TransformConfig
    train: TrainConfig
    split: SplitConfig
    verbose: bool = False

    def flow_parameters(self) -> dict[str, Any]:
        """The keyword arguments of the flow (flows.full.full): every run setting, and the configs."""
        return {**dict(self.run), "transform": self.transform, "train": self.train, "split": self.split}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.run.model_dump(mode="json"),
            "transform": self.transform.model_dump(mode="json", exclude={"size"}),
            "train": self.train.model_dump(mode="json"),
            "split": self.split.model_dump(mode="json"),
        }


MAX_CONFIG_BYTES = 100_000  # a settings file is a few hundred bytes
SHOWN_CHARS = 40  # a value quoted in an error message is cut to this many characters


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how many there were: a value echoed in an error stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain_yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader without anchors and aliases: nothing in a settings file needs them, and
    they are how a few hundred bytes expand to gigabytes ("billion laughs") or recurse forever."""

    class PlainLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(f"anchors and aliases (&name, *name) are not allowed (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

    return PlainLoader


def _read_config_file(path: str) -> dict[tuple[str, ...], Any]:
    """The file's settings by path; flat keys are option names (dashes or underscores)."""
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror or error}); give an existing TOML or YAML file")
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; a settings file is a few lines")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write the file as TOML") from None
            data = yaml.load(text, Loader=_plain_yaml_loader(yaml)) or {}
        else:
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
    except UsageError:
        raise
    except Exception as error:  # a syntax error: one line, not a traceback
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"--config {path}: not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'TOML'}: "
                         f"{cut(first_line, 200)}")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of settings at the top level")

    by_path = {option.path: option for option in OPTIONS}
    found: dict[tuple[str, ...], Any] = {}

    def take(prefix: tuple[str, ...], table: dict) -> None:
        for key, value in table.items():
            name = str(key).replace("-", "_")
            if not prefix and name in SECTIONS and isinstance(value, dict):
                take((name,), value)
            elif prefix and isinstance(value, dict) and (*prefix, name) not in by_path:
                take((*prefix, name), value)
            elif not prefix and f"--{name.replace('_', '-')}" in BY_FLAG:
                found[BY_FLAG[f"--{name.replace('_', '-')}"].path] = value
            elif (*prefix, name) in by_path:
                found[(*prefix, name)] = value
            else:
                where = ".".join((*prefix, name))
                raise UsageError(f"--config {path}: unknown setting {cut(repr(where))}; `pneumo run --help` lists them")

    take((), data)
    return found


def _nested(given: dict[tuple[str, ...], Any], section: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in given.items():
        if path[0] != section:
            continue
        table = out
        for name in path[1:-1]:
            table = table.setdefault(name, {})
        table[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def overridden(base: BaseModel, values: dict[str, Any], strict: bool = False) -> BaseModel:
    """``base`` with ``values`` (nested tables merged field by field) in place of its own, validated."""
    return type(base).model_validate(_merge(base.model_dump(), values), strict=strict)


def _tuples(value: Any) -> Any:
    """Lists (TOML/YAML arrays, repeated command-line values) as tuples, the type strict validation expects."""
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def apply_recipe(
    recipe: str, transform: Optional[TransformConfig] = None, train: Optional[TrainConfig] = None
) -> tuple[TransformConfig, TrainConfig]:
    """The recipe's configs with the fields set explicitly in ``transform`` and ``train`` replaced.

    Only explicitly given fields count (pydantic's ``exclude_unset``), so the flow's
    ``--param train='{"epochs": 50}'`` changes the epochs of the recipe, not the rest of it.
    """
    base = RECIPES[recipe]

    def given(config: Optional[BaseModel]) -> dict[str, Any]:
        return {} if config is None else config.model_dump(exclude_unset=True)

    return overridden(base.transform, given(transform)), overridden(base.train, given(train))  # type: ignore[return-value]


def _flag_of(section: str, loc: tuple) -> str:
    path = (section, *[str(part) for part in loc if not isinstance(part, int)])
    for option in OPTIONS:
        if option.path == path:
            return option.flag
    return f"{section} settings"


def _validation_line(section: str, error: ValidationError, given: dict[tuple[str, ...], Any]) -> str:
    first = error.errors()[0]
    flag = _flag_of(section, tuple(first["loc"]))
    option = BY_FLAG.get(flag)
    value = given.get(option.path) if option else None
    shown = f" {cut(_shown(tuple(value) if isinstance(value, list) else value))}" if option and option.path in given else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{flag}{shown}: {message[0].lower()}{message[1:]}; see `pneumo run --help`"


def resolve(given: dict[tuple[str, ...], Any], verbose: bool = False) -> Settings:
    """Defaults < recipe < given values, validated by the models in strict mode: ``epochs = true``
    or ``percentile = "75"`` is refused, not read as 1 or 75 (an int is still a float)."""
    sections: dict[str, BaseModel] = {}
    given = {path: _tuples(value) for path, value in given.items()}
    try:
        run = RunSettings.model_validate(_nested(given, "run"), strict=True)
    except ValidationError as error:
        raise UsageError(_validation_line("run", error, given)) from None
    recipe = RECIPES[run.recipe]
    bases = {"transform": recipe.transform, "train": recipe.train, "split": SplitConfig()}
    for section, base in bases.items():
        try:
            sections[section] = overridden(base, _nested(given, section), strict=True)
        except ValidationError as error:
            raise UsageError(_validation_line(section, error, given)) from None
    return Settings(run, sections["transform"], sections["train"], sections["split"], verbose)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checks before any service starts


def _local_writable(flag: str, folder: str) -> None:
    path = Path(folder).expanduser()
    probe = path / f".pneumo-write-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag} {folder}: not writable ({error.strerror or error}); choose a folder you can write to") from None


def _bucket_reachable(flag: str, uri: str) -> None:
    """One cheap call (HeadBucket) that proves the endpoint answers, the bucket exists and the credentials work."""
    from pneumo import storage

    bucket, _ = storage.split_s3(uri)
    try:
        with storage.s3_errors(uri, "HeadBucket"):
            storage.s3_client().head_bucket(Bucket=bucket)
    except Exception as error:  # S3Error, or botocore's missing-credentials errors
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{flag} {uri}: {text}; check the bucket name, AWS credentials and AWS_ENDPOINT_URL") from None


def _refuse_missing_classes(source: str, missing: list[str]) -> None:
    if missing:
        raise UsageError(
            f"--source {source}: no images in {', '.join(missing)}; every split needs both classes "
            "(train/NORMAL and train/PNEUMONIA, and the same in val/ and test/ when the source has them)"
        )


def _check_source(source: str) -> None:
    from pneumo import download

    try:
        parsed = download.parse_source(source)
    except ValueError as error:
        raise UsageError(f"--source: {error}") from None
    if parsed.kind == "dir":
        folder = Path(parsed.location)
        classes = [name for name in download.CLASSES if (folder / name).is_dir()]
        if classes:  # .../chest_xray/train: one level too deep
            raise UsageError(
                f"--source {source}: this is one split's folder (it holds {'/ and '.join(classes)}/); "
                f"pass the folder above it: --source {folder.parent}"
            )
        try:
            root = download.find_dataset_root(folder)
        except ValueError as error:
            raise UsageError(f"--source: {error}") from None
        _refuse_missing_classes(source, download.missing_class_folders(root))
    elif parsed.kind == "zip":
        import zipfile

        if not zipfile.is_zipfile(parsed.location):
            raise UsageError(f"--source {source}: not a readable zip archive; give the dataset's .zip or its unpacked folder")
        with zipfile.ZipFile(parsed.location) as archive:
            _refuse_missing_classes(source, download.missing_class_folders_in_zip(archive.namelist()))
    elif parsed.kind == "kaggle" and not download.kaggle_credentials_found():
        raise UsageError(f"--source {source}: no Kaggle credentials found: {download.KAGGLE_CREDENTIALS_HINT}")
    elif parsed.kind in ("s3_zip", "s3_prefix"):
        _bucket_reachable("--source", parsed.location)


def check(settings: Settings) -> None:
    """Refuse, as UsageError, what the run would only discover later; contacts each S3 bucket once."""
    from pneumo import storage

    run = settings.run
    try:
        validate_model_name(run.model_name)
    except ValueError as error:
        raise UsageError(f"--model-name: {error}") from None
    if run.dask_address and run.runner != "dask":
        raise UsageError(f"--dask-address {run.dask_address}: only used with --runner dask; add --runner dask or drop it")
    _check_source(run.source)
    buckets_seen = set()
    for flag, uri in (("--workdir", run.workdir), ("--registry", run.registry)):
        if not uri:
            continue
        if storage.is_s3(uri):
            bucket = storage.split_s3(uri)[0]
            if bucket not in buckets_seen:
                buckets_seen.add(bucket)
                _bucket_reachable(flag, uri)
        else:
            _local_writable(flag, uri)


def load(ctx: Any, values: dict[str, Any], prog: str) -> Optional[Settings]:
    """Resolve and check the command's values; a bad value prints one line to stderr and exits with code 2."""
    try:
        settings = from_command(ctx, values)
        if settings is not None:
            check(settings)
    except UsageError as error:
        # Any other long word (a value quoted by a check further down) is cut too.
        message = re.sub(r"\S{200,}", lambda word: cut(word[0]), str(error))
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings
