"""The one typed run config: ``RunConfig(run, transform, split, train)``.

Every field is declared once, here, with its description; its default is the default
recipe's (``robust4``). A recipe (pneumo.recipes) is a partial config that ``RunConfig``
puts under the values given, once, in its validator. The CLI's options (cli/run.py), the
flow's parameters (flows/full.py) and the card's stored config are all read from these models.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumo.names import DEFAULT_CHAMPION_METRIC, ChampionMetric, validate_model_name
from pneumo.recipes import DEFAULT_RECIPE, RECIPES, RecipeName

KAGGLE_DEFAULT_SOURCE = "kaggle:paultimothymooney/chest-xray-pneumonia"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """A stable sha256 of the config, for keys and file names."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()


def _zoom_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0.5 <= value[0] <= value[1] <= 2.0:
        raise ValueError(f"zoom must be (low, high) with 0.5 <= low <= high <= 2, got {value}")
    return value


class AugmentConfig(_Config):
    """Ranges of the random renditions of train images (pneumo.augment); the defaults are robust3's.

    Each rendition draws every parameter uniformly from its range: zoom in [zoom[0], zoom[1]]
    (> 1 magnifies), translation up to +-``shift`` of the width and height, rotation up to
    +-``rotation`` degrees, gamma e^u with u in +-``gamma``, contrast about the image mean
    e^u with u in +-``contrast``, brightness +-``brightness`` on the [0, 1] scale.
    ``aspect`` stretches one axis against the other (zoom_x = zoom e^u, zoom_y = zoom e^-u,
    u in +-``aspect``), so that the chest's width stops being a clue; ``blur`` is the share of
    renditions blurred, with sigma in ``blur_sigma`` (fractions of the film's short side).
    """

    zoom: tuple[float, float] = Field((0.85, 1.2), description="Zoom factor range; 0.9 shows more of the film, 1.12 less")
    shift: float = Field(
        0.08,
        ge=0.0,
        le=0.25,
        # The name 'shift' stays because cards store it; pneumo.augment says translate_x/translate_y.
        description="Largest translation, as a fraction of width and height",
    )
    rotation: float = Field(8.0, ge=0.0, le=30.0, description="Largest rotation in degrees")
    gamma: float = Field(0.5, ge=0.0, le=1.0, description="Largest |log gamma|")
    contrast: float = Field(0.3, ge=0.0, le=1.0, description="Largest |log contrast| about the image mean")
    brightness: float = Field(0.08, ge=0.0, le=0.5, description="Largest brightness offset on the [0, 1] scale")
    aspect: float = Field(0.2, ge=0.0, le=0.5, description="Largest |log| of the aspect change: zoom_x = zoom e^u, zoom_y = zoom e^-u")
    blur: float = Field(0.3, ge=0.0, le=1.0, description="Share of renditions blurred (Gaussian)")
    blur_sigma: tuple[float, float] = Field(
        (0.005, 0.015), description="Blur sigma range, as fractions of the film's short side"
    )

    @field_validator("zoom")
    @classmethod
    def _zoom_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _zoom_range(value)

    @field_validator("blur_sigma")
    @classmethod
    def _blur_sigma_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1] <= 0.1:
            raise ValueError(f"blur_sigma must be (low, high) with 0 <= low <= high <= 0.1, got {value}")
        return value


class ViewConfig(_Config):
    """Test-time views (pneumo.views): a film is scored as the mean probability over itself and ``count``
    mild geometric views of it, each drawn from these ranges by a generator seeded by (``seed``, the
    film's sha256), so a film always gets the same score. Stored in the card: every score of a version
    (its val, test and stress-val metrics, its threshold, predict, serve, the batch flow) uses them."""

    count: int = Field(16, ge=0, le=64, description="Views per film beside the film itself; 0 = the single-pass score")
    zoom: tuple[float, float] = Field((0.92, 1.09), description="Zoom factor range of a view")
    shift: float = Field(0.04, ge=0.0, le=0.25, description="Largest translation of a view, as a fraction of width and height")
    rotation: float = Field(4.0, ge=0.0, le=30.0, description="Largest rotation of a view in degrees")
    aspect: float = Field(0.1, ge=0.0, le=0.5, description="Largest |log| aspect change of a view (zoom_x = zoom e^u, zoom_y = zoom e^-u)")
    seed: int = Field(0, ge=0, description="Seeds the views, with each film's sha256")

    @field_validator("zoom")
    @classmethod
    def _zoom_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _zoom_range(value)


class TransformConfig(_Config):
    """The image recipe: resize, trim padding, crop borders, gray [0, 1], pool, normalize, flatten (robust4's defaults)."""

    size: tuple[int, int] = Field(
        (1000, 1300), description="(height, width) every image is resized to; the pipeline sets it from the size percentile"
    )
    crop_fraction: float = Field(0.02, ge=0.0, lt=0.5, description="Fraction cut from each border after resizing")
    grid: tuple[int, int] = Field((7, 10), description="Rows and columns of the pooling grid; features = rows * cols per pooling part")
    method: Literal["fast", "exact", "resample"] = Field(
        "resample",
        description="'exact' decodes full resolution; 'fast' decodes at a reduced JPEG scale (max pooling only); "
        "'resample' resamples the crop to cell_pixels per cell: needed for mean pooling, normalization and renditions",
    )
    pooling: tuple[Literal["max", "mean"], ...] = Field(
        ("max", "mean"), description="Pooling parts, concatenated in this order (--transform.pooling max mean); features = rows * cols * parts"
    )
    normalize: Literal["none", "zscore"] = Field("zscore", description="'zscore': each pooling part scaled to mean 0, sd 1 per image")
    cell_pixels: int = Field(8, ge=2, le=64, description="'resample': pixels per cell side of the resampled crop")
    trim_padding: bool = Field(
        True, description="'resample': cut flat bands (a scanner's or viewer's padding) off the picture's borders before the crop"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Ranges of the train renditions")
    renditions: int = Field(48, ge=0, le=64, description="Augmented renditions stored per train image beside the original; 0 = off")
    augment_seed: int = Field(0, ge=0, description="Seeds the renditions, with each image's sha256 and the rendition number")
    shift_suite: bool = Field(True, description="Store val and test features under the acquisition shifts of pneumo.shift")
    shift_seed: int = Field(0, ge=0, description="Seeds the shift suite's random parts (shift direction, border widths, noise)")
    max_pixels: int = Field(
        50_000_000, gt=0, description="Images with more pixels are refused (decompression-bomb guard); X-rays are under 10 MP"
    )
    views: ViewConfig = Field(default_factory=ViewConfig, description="Test-time views: how every score of the model is made")
    accept_lateral: bool = Field(
        False, description="Keep lateral DICOM films (ViewPosition LL, RL, LATERAL...), recorded in the manifest's view; "
        "by default they are quarantined as out of scope. Stored in the card: the model's predict and serve accept them too"
    )

    @field_validator("size", "grid")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"must be two positive integers, got {value}")
        return value

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"pooling must name 'max' and/or 'mean' once each, got {value}")
        return value

    @model_validator(mode="after")
    def _method_supports(self) -> "TransformConfig":
        # 'fast' and 'exact' are the seed's max-pool recipe; everything else needs the resampled crop.
        resample_only = self.pooling != ("max",) or self.normalize != "none" or self.renditions or self.trim_padding or self.views.count
        if self.method != "resample" and resample_only:
            raise ValueError(
                f"method {self.method!r} computes the seed's max-pool features only; "
                "use method='resample' for mean pooling, normalization, renditions, trimmed padding or views"
            )
        return self

    @classmethod
    def stored(cls, data: dict) -> "TransformConfig":
        """A transform as an index or card stored it: a field it lacks is newer than it, and had the seed's value then."""
        return cls.model_validate(merged(RECIPES["seed"]["transform"], data))

    @property
    def n_features(self) -> int:
        return self.grid[0] * self.grid[1] * len(self.pooling)

    def row_settings(self) -> dict:
        """The settings that decide what prediction computes (an image's own row and its views): all but the
        train renditions and the shift suite. Models with equal row settings read each other's val rows."""
        return self.model_dump(mode="json", exclude={"augment", "renditions", "augment_seed", "shift_suite", "shift_seed"})


class SplitConfig(_Config):
    """How validation and test sets are carved from train, always by patient."""

    val_fraction: float = Field(0.10, gt=0.0, lt=0.5, description="Share of train patients carved out for validation")
    test_fraction: float = Field(
        0.15, gt=0.0, lt=0.5, description="Share of train patients carved out for test when the source has no test split"
    )
    min_val_images: int = Field(
        100, ge=0, description="A source val split smaller than this is folded into train and val is carved instead"
    )
    salt: str = Field("pneumo-v1", description="Salt of the patient hash that assigns carved splits")
    near_duplicate_bits: int = Field(
        112, ge=0, le=512,
        description="Images whose 1024-bit fingerprints differ in at most this many bits are one film and share a split "
        "(re-encoded/resized copies: <= 74 bits; distinct films: >= 153 on the shared data); also against "
        "the mirror image's and a held-out film's turned and cropped fingerprints",
    )


class TrainConfig(_Config):
    """TinyNet training: AdamW, BCE with class weights, weight averaging (robust4's defaults)."""

    epochs: int = Field(30, ge=1, description="Maximum number of epochs")
    batch_size: int = Field(128, ge=1, description="Training rows per optimizer step")
    lr: float = Field(1e-3, gt=0.0, description="Learning rate of the optimizer: AdamW, or the seed's plain Adam when weight_decay is 0")
    loss: Literal["hinge", "bce"] = Field("bce", description="'hinge': the seed's Keras-style hinge on the sigmoid output; 'bce': binary cross-entropy")
    balance: Literal["downsample", "class_weights", "none"] = Field(
        "class_weights", description="Class imbalance of train: 'downsample' the majority class, 'class_weights' in the loss, or 'none'"
    )
    patience: int = Field(10, ge=1, description="Epochs without a better validation loss before stopping")
    seed: int = Field(0, description="Seeds sampling, initialisation and shuffling")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Decision threshold for the reported metrics")
    threshold_rule: Literal["fixed", "stress_youden"] = Field(
        "stress_youden", description="'fixed': use threshold; 'stress_youden': the threshold that maximizes Youden's J "
        "(sensitivity + specificity - 1) on the stress val"
    )
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW's decoupled weight decay; 0 keeps the seed's plain Adam")
    swa_start: int = Field(
        11, ge=0, description="Average the weights of every epoch from this one on (SWA; from the last epoch if the "
        "budget is shorter) and train all epochs; 0 = off: keep the best validation-loss epoch"
    )


class ModelLocation(_Config):
    """Where models are: shared by `pneumo run` and the commands that read the registry."""

    workdir: str = Field("./pneumo-data", description="Root for downloads, stats, shards, registry and Prefect results (local path or s3://)")
    registry: Optional[str] = Field(None, description="Model registry root, a folder or s3:// prefix (default: WORKDIR/registry)")
    model_name: str = Field("tinynet", description="Name the model is registered under")

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        validate_model_name(value)  # it becomes a folder name in the registry
        return value

    def registry_uri(self) -> str:
        from pneumo import workdir as layout

        return layout.absolute(self.registry) if self.registry else layout.registry(layout.absolute(self.workdir))


class RunOptions(_Config):
    """The run's own settings: which recipe, how to schedule the work, when to promote."""

    recipe: RecipeName = Field(
        DEFAULT_RECIPE,
        description="Preset of transform and training values (pneumo.recipes): 'seed' is the faithful port of the seed, "
        "'robust' adds shape features, renditions and class-weighted BCE, 'robust2' widens the renditions, averages "
        "weights and picks its threshold on the stress val, 'robust3' also cuts flat border bars, 'robust4' (the "
        "default) trains on 48 renditions and scores every film with 16 mild views; "
        "values given explicitly override the recipe's",
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
        False, description="Fingerprint a local source by the sha256 of every file instead of sizes and mtimes (reads every byte)"
    )
    runner: Literal["threads", "processes", "dask"] = Field(
        "processes",
        description="Where the shard tasks transform images: 'processes' hands the pixel work to a local pool of "
        "worker processes, 'threads' does it in the tasks' threads, 'dask' runs the tasks on Dask workers",
    )
    workers: Optional[int] = Field(None, ge=1, description="Parallel shard tasks, and processes or Dask workers (default: CPU count)")
    dask_address: Optional[str] = Field(None, description="Scheduler of an existing Dask cluster, e.g. tcp://host:8786 (with runner dask)")


def _given(value: Any) -> Any:
    """What was given: a model's explicitly set fields (nested), a dict as it is."""
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` on top, nested tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        value = _given(value)
        out[key] = merged(_given(out[key]), value) if isinstance(value, dict) and isinstance(_given(out.get(key)), dict) else value
    return out


class RunConfig(ModelLocation):
    """Everything one run reads: where (source, workdir, registry, model name, at the top level, so a
    deployment's own stay when a run overrides a section) and how (the four sections). The recipe
    named by ``run.recipe`` supplies what is not given."""

    source: str = Field(
        KAGGLE_DEFAULT_SOURCE,
        description="A folder in the Kaggle layout (train/NORMAL, train/PNEUMONIA, ...), a .zip of it, "
        "s3://bucket/archive.zip, s3://bucket/prefix, or kaggle:OWNER/DATASET (needs Kaggle credentials)",
    )
    run: RunOptions = Field(default_factory=RunOptions, description="The run's own settings")
    transform: TransformConfig = Field(default_factory=TransformConfig, description="The image recipe")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How val and test are carved out")
    train: TrainConfig = Field(default_factory=TrainConfig, description="TinyNet training")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        # The one place a recipe is applied: under the given values, so an explicit value always wins.
        if not isinstance(data, dict):
            return data
        given = {key: _given(value) for key, value in data.items()}
        recipe = (given.get("run") or {}).get("recipe", DEFAULT_RECIPE)
        return merged(RECIPES.get(recipe, {}), given)  # an unknown name: RunOptions says so


class Recipe(NamedTuple):
    transform: TransformConfig
    train: TrainConfig


def recipe_config(name: str, **given: Any) -> RunConfig:
    """The run config of recipe ``name`` with ``given`` sections (dicts or models) on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    run = dict(given.pop("run", None) or {}, recipe=name)
    return RunConfig(run=run, **given)


def recipe(name: str) -> Recipe:
    """The named recipe's transform and training configs; a clear error for an unknown name."""
    resolved = recipe_config(name)
    return Recipe(resolved.transform, resolved.train)


def seed_transform(**changes: Any) -> TransformConfig:
    """The seed's transform with ``changes``: what library tests and benchmarks compare against."""
    return recipe_config("seed", transform=changes).transform


def seed_train(**changes: Any) -> TrainConfig:
    """The seed's training config with ``changes``."""
    return recipe_config("seed", train=changes).train


BATCH_INPUT = ("What to score: a folder (flat, or NORMAL/PNEUMONIA subfolders for metrics), a .zip, "
               "s3://bucket/archive.zip or s3://bucket/prefix")


class BatchOptions(ModelLocation):
    """The batch flow's settings beside its input (`pneumo predict-batch`, flows/predict.py)."""

    alias: str = Field("champion", description="Alias of the version to use")
    version: Optional[str] = Field(None, description="A version (e.g. v0003) instead of the alias")
    chunk_size: int = Field(1000, ge=1, description="Images per scoring task")
    runner: Literal["threads", "processes"] = Field("processes", description="Where the chunks' pixel work runs")
    workers: Optional[int] = Field(None, ge=1, description="Parallel chunks (default: CPU count)")
    retries: int = Field(3, ge=0, le=20, description="Retries per task for errors a retry can fix")


# --------------------------------------------------------------------------- settings files

MAX_SETTINGS_BYTES = 100_000  # a settings file is a few hundred bytes


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML (or, with PyYAML, YAML) file: source, workdir, ... and the tables run, transform, split, train.

    ValueError in one line when unreadable, too large or not TOML/YAML; pydantic's ValidationError for a
    value of the wrong type (files are typed: ``epochs = true`` is refused, not read as 1).
    """
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_SETTINGS_BYTES + 1)
    except OSError as error:
        raise ValueError(f"cannot read it ({error.strerror or error}); give an existing TOML or YAML file") from None
    if len(text) > MAX_SETTINGS_BYTES:
        raise ValueError(f"larger than {MAX_SETTINGS_BYTES} bytes; a settings file is a few lines")
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = _load_yaml(text) if yaml_file else tomllib.loads(text.decode("utf-8"))
    except Exception as error:  # a syntax error: one line, not a traceback
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"not valid {'YAML' if yaml_file else 'TOML'}: {first[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError("expected settings (source = ..., and tables run, transform, split, train)")
    _check_types(data)
    return data


def _check_types(data: dict) -> None:
    def tuples(value: Any) -> Any:  # arrays as the tuples strict validation expects
        return tuple(map(tuples, value)) if isinstance(value, list) else {k: tuples(v) for k, v in value.items()} if isinstance(value, dict) else value

    try:
        RunConfig.model_validate(tuples(data), strict=True)
    except ValidationError as error:
        # A field's own type; unknown keys are the CLI's to name (with the nearest option), and combinations
        # (the fast method with renditions) are judged once the command line is in.
        typed = [e for e in error.errors() if len(e["loc"]) > 1 and e["type"] != "extra_forbidden"]
        if typed:
            raise ValidationError.from_exception_data(error.title, typed) from None


def _load_yaml(text: bytes) -> Any:
    """PyYAML's safe loader without anchors and aliases, which is how a few bytes expand to gigabytes."""
    try:
        import yaml
    except ImportError:
        raise ValueError("YAML needs PyYAML (pip install pyyaml); or write the file as TOML") from None

    class PlainLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(f"anchors and aliases (&name, *name) are not allowed (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=PlainLoader) or {}
