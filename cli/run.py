"""`pneumo run` (= `python flows/full.py`): the RunConfig from the command line over --config over the
recipe, checked in about a second, then the flow.

The options are cyclopts' reading of pneumo.config.RunConfig: every field by its dotted name
(``--train.lr``, ``--transform.augment.zoom 0.9 1.1``), five by a short name too. No Prefect
import until the checks pass: a bad value is refused at once with exit 2.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional

import cyclopts
from cyclopts import Parameter

from pneumo.config import RunConfig

# The most used fields also answer to a short name.
# (source, workdir, registry and model name are top-level fields: --source, --workdir, ... already.)
SHORT_NAMES = {("run", "recipe"): "--recipe", ("run", "retrain"): "--retrain",
               ("train", "epochs"): "--epochs", ("train", "seed"): "--seed"}
SECTIONS = ("run", "transform", "split", "train")
MAX_CONFIG_BYTES = 100_000  # a settings file is a few hundred bytes


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
    """The settings of a TOML (or, with PyYAML, YAML) file: source, workdir, ... and the tables run, transform, split, train."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror or error}); give an existing TOML or YAML file") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; a settings file is a few lines")
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = _load_yaml(text) if yaml_file else __import__("tomllib").loads(text.decode("utf-8"))
    except UsageError:
        raise
    except Exception as error:  # a syntax error: one line, not a traceback
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--config {path}: not valid {'YAML' if yaml_file else 'TOML'}: {first[:200]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected settings (source = ..., and tables run, transform, split, train)")
    _strictly_typed(data)
    return data


def _strictly_typed(data: dict) -> None:
    """A file's values are typed already: ``epochs = true`` or ``percentile = "75"`` is refused, not read as 1 or 75."""
    from pydantic import ValidationError

    def tuples(value: Any) -> Any:  # arrays as the tuples strict validation expects
        return tuple(map(tuples, value)) if isinstance(value, list) else {k: tuples(v) for k, v in value.items()} if isinstance(value, dict) else value

    try:
        RunConfig.model_validate(tuples(data), strict=True)
    except ValidationError as error:
        # A field's own type; unknown keys are cyclopts' to name (with the nearest option), and combinations
        # (the fast method with renditions) are judged once the command line is in.
        typed = [e for e in error.errors() if len(e["loc"]) > 1 and e["type"] != "extra_forbidden"]
        if typed:
            raise UsageError(error_line(ValidationError.from_exception_data(error.title, typed))) from None


def _load_yaml(text: bytes) -> Any:
    """PyYAML's safe loader without anchors and aliases, which is how a few bytes expand to gigabytes."""
    try:
        import yaml
    except ImportError:
        raise UsageError("--config: YAML needs PyYAML (pip install pyyaml); or write the file as TOML") from None

    class PlainLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(f"anchors and aliases (&name, *name) are not allowed (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=PlainLoader) or {}


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
    from pneumo import storage

    run = config.run  # the model name was checked by ModelLocation, where it is declared
    if run.dask_address and run.runner != "dask":
        raise UsageError(f"--run.dask-address {run.dask_address}: only used with --run.runner dask; add it or drop this")
    _check_source(config.source)
    buckets = set()
    for flag, uri in (("--workdir", config.workdir), ("--registry", config.registry)):
        if uri and storage.is_s3(uri):
            if storage.split_s3(uri)[0] not in buckets:
                buckets.add(storage.split_s3(uri)[0])
                _bucket_reachable(flag, uri)
        elif uri:
            _local_writable(flag, uri)


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

    try:
        with storage.s3_errors(uri, "HeadBucket"):
            storage.s3_client().head_bucket(Bucket=storage.split_s3(uri)[0])
    except Exception as error:  # S3Error, or botocore's missing-credentials errors
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{flag} {uri}: {text}; check the bucket name, AWS credentials and AWS_ENDPOINT_URL") from None


def _refuse_missing_classes(source: str, missing: list[str]) -> None:
    if missing:
        raise UsageError(f"--source {source}: no images in {', '.join(missing)}; every split needs both classes "
                         "(train/NORMAL and train/PNEUMONIA, and the same in val/ and test/ when the source has them)")


def _check_source(source: str) -> None:
    from pneumo import download

    try:
        parsed = download.parse_source(source)
        if parsed.kind == "dir":
            folder = Path(parsed.location)
            classes = [name for name in download.CLASSES if (folder / name).is_dir()]
            if classes:  # .../chest_xray/train: one level too deep
                raise UsageError(f"--source {source}: this is one split's folder (it holds {'/ and '.join(classes)}/); "
                                 f"pass the folder above it: --source {folder.parent}")
            _refuse_missing_classes(source, download.missing_class_folders(download.find_dataset_root(folder)))
    except ValueError as error:
        raise UsageError(f"--source: {error}") from None
    if parsed.kind == "zip":
        import zipfile

        if not zipfile.is_zipfile(parsed.location):
            raise UsageError(f"--source {source}: not a readable zip archive; give the dataset's .zip or its unpacked folder")
        with zipfile.ZipFile(parsed.location) as archive:
            _refuse_missing_classes(source, download.missing_class_folders_in_zip(archive.namelist()))
    elif parsed.kind == "kaggle" and not download.kaggle_credentials_found():
        raise UsageError(f"--source {source}: no Kaggle credentials found: {download.KAGGLE_CREDENTIALS_HINT}")
    elif parsed.kind in ("s3_zip", "s3_prefix"):
        _bucket_reachable("--source", parsed.location)


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
