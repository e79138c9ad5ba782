"""Score X-rays with a registered model: every preprocessing constant comes from its card.

    predictor = Predictor.from_registry("./pneumo-data/registry", alias="champion")
    for p in predictor.predict(["a.jpeg", "b.jpeg"]):
        print(p.input, p.label, p.probability, p.warnings)

Features are computed by ``pneumo.transform.featurize`` with the card's own
``config.transform``, the code path that built the training shards, so training and
prediction cannot drift; the decision threshold is the card's ``threshold``. A film's score is
``pneumo.views.film_scores`` over the film and the card's test-time views (``transform.views``),
as the card's own figures were scored; ``views=0`` gives the single-pass score. Each film also
gets its Mahalanobis distance from the training rows (the version's reference.json,
pneumo.reference) and a warning past the card's cut-off. Cards written
before schema_version 2 lack these and are refused with the missing field named.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import numpy as np
from PIL import Image

from pneumo import registry as reg
from pneumo import storage
from pneumo.config import TransformConfig
from pneumo.dicom import is_dicom
from pneumo.images import ImageRejected, decode_gray, header_size, open_image, open_top_rows, oriented_size, read_file
from pneumo.labels import CLASSES, LABELS
from pneumo.manifest import is_junk
from pneumo import onnx_model, views
from pneumo.onnx_model import OnnxModel
from pneumo.reference import Reference, distances, load_reference
from pneumo.reference import warning as reference_warning
from pneumo.transform import Resampler, featurize, pool_features

if TYPE_CHECKING:
    import torch

OLDEST_CARD_SCHEMA = 2  # the oldest registry.CARD_SCHEMA_VERSION prediction can use

# Out-of-distribution warnings. The image is still scored; the warning says why to doubt it.
# Either side under this fraction of the card's resize target: upsampled far beyond training.
TINY_FRACTION = 0.25
# Width/height more than this factor away from the resize target's own width/height.
ASPECT_FACTOR = 2.0
# Mean spread between the colour channels, in gray levels of 255: X-rays are gray (~0).
COLOUR_LEVELS = 20.0
COLOUR_ROWS = 0.3  # JPEGs: the share of rows, from the top, looked at for colour
# Features spreading less than this (std over the cells, [0, 1] scale): a nearly uniform picture.
# X-rays spread ~0.1 to 0.3; the transform's own flat-film fallback starts at 0.04.
BLANK_SPREAD = 0.02

# An input: a path, raw bytes, or (name, bytes) so that uploads keep their file name.
Input = Union[str, Path, bytes, tuple[str, bytes]]


class CardError(ValueError):
    """A registered version that prediction cannot use; the message names the problem."""


class ModelNotFound(FileNotFoundError):
    """No such registry, model, version or alias; the message says what exists."""


@dataclass
class Prediction:
    input: str  # the path, or the upload's name
    probability: Optional[float]  # of PNEUMONIA; None when the input could not be scored
    label: Optional[str]  # "NORMAL" / "PNEUMONIA"
    threshold: float
    model: dict[str, str]  # {"name": ..., "version": ...}
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None  # why the input could not be scored
    distance: Optional[float] = None  # Mahalanobis distance from the training rows (None: no reference)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transform_config(card: reg.CardContent, views: Optional[int] = None) -> TransformConfig:
    """The card's full transform config, with anything that only augments training switched off, and
    ``views`` test-time views instead of the card's when given (0: the single-pass score).
    (A transform that does not fit this pneumo's TransformConfig was refused when the card was read.)"""
    config = card.config.transform
    chosen = config.views if views is None else config.views.model_copy(update={"count": int(views)})
    return config.model_copy(update={"renditions": 0, "views": chosen})  # extra augmented copies: training only


def check_card(card: reg.CardContent, where: str = "card") -> None:
    """Refuse a card that lacks what prediction needs, naming each missing field.
    (Their values were checked when the card was read: a threshold between 0 and 1, ...)"""
    missing = [name for name, value in (
        ("schema_version", card.schema_version),
        ("threshold", card.threshold),
        ("config.transform", card.config.transform if card.config else None),
    ) if value is None]
    if missing:
        raise CardError(
            f"{where} cannot be used for prediction: its card lacks {', '.join(missing)} "
            f"(an older card, schema_version {card.schema_version or 1}; prediction needs {OLDEST_CARD_SCHEMA}). "
            "Train and register a new version with this pneumo (pneumo run --retrain)."
        )
    if card.schema_version < OLDEST_CARD_SCHEMA:
        raise CardError(
            f"{where} has an older card (schema_version {card.schema_version}; prediction needs "
            f"{OLDEST_CARD_SCHEMA}). Train and register a new version with this pneumo (pneumo run --retrain)."
        )


def resolve_version(registry: str, model_name: str, alias: Optional[str], version: Optional[str]) -> str:
    """The version to load, or ModelNotFound saying what the registry does hold."""
    if not storage.is_s3(registry) and not Path(registry).is_dir():
        raise ModelNotFound(f"registry {registry} does not exist (train a model first: pneumo run --source ...)")
    try:
        return reg.resolve(registry, model_name, version if version is not None else alias or reg.CHAMPION)
    except (reg.VersionNotFound, reg.BrokenAlias) as error:  # one line naming what is missing or the broken alias file
        raise ModelNotFound(str(error)) from None


def torch_network(state_dict: dict[str, torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    """The version's network on torch (imported here: seconds), rows of features in, probabilities out."""
    from pneumo.model import TinyNet, predict_proba

    network = TinyNet(n_features=state_dict["hidden1.weight"].shape[1])
    network.load_state_dict(state_dict)
    network.eval()
    return lambda features: predict_proba(network, features)  # the same scoring as evaluation


class Predictor:
    """One registered version, ready to score images.

    The network runs on onnxruntime when the version has model.onnx (``onnx``), which
    spares the seconds of importing torch; otherwise on torch from ``state_dict``.
    """

    def __init__(
        self,
        state_dict: Optional[dict[str, torch.Tensor]],
        card: reg.CardContent | dict[str, Any],
        *,
        model_name: str,
        version: str,
        max_pixels: Optional[int] = None,
        onnx: Optional[OnnxModel] = None,
        reference: Optional[Reference] = None,
        views: Optional[int] = None,
    ):
        where = f"{model_name} {version}"
        if not isinstance(card, reg.CardContent):  # a card built by hand: the checks of a loaded one
            try:
                card = reg.check_card_content(card, where)  # labels, threshold, transform: no request may fail on them
            except reg.CorruptCard as error:
                raise CardError(str(error)) from None
        check_card(card, where)
        self.card = card
        self.model_name, self.version = model_name, version
        self.threshold = float(card.threshold)
        self.labels = {int(k): v for k, v in (card.labels or LABELS).items()}
        if views is not None and not 0 <= views <= 64:
            raise ValueError(f"views must be between 0 and 64, got {views}")
        if views and card.config.transform.method != "resample":
            raise ValueError(f"{where} computes the seed's features ({card.config.transform.method!r}): views need 'resample'")
        config = transform_config(card, views)
        self.reference = reference
        self.ood_cutoff = reference.ood_cutoff if reference is not None else None
        if reference is not None and reference.n_features != config.n_features:
            raise CardError(f"{where}: reference.json has {reference.n_features} features, the card's transform {config.n_features}")
        if max_pixels is not None and max_pixels < config.max_pixels:
            config = config.model_copy(update={"max_pixels": max_pixels})  # a bound only; features unchanged
        self.config = config
        if onnx is not None:
            n_features, self.runtime, self.network = onnx.n_features, "onnxruntime", onnx
        else:
            n_features, self.runtime = state_dict["hidden1.weight"].shape[1], "torch"
        if n_features != config.n_features:
            raise CardError(
                f"{where}: {'model.onnx' if onnx else 'model.pt'} takes {n_features} features "
                f"but the card's transform gives {config.n_features}"
            )
        if onnx is None:
            self.network = torch_network(state_dict)

    @classmethod
    def from_registry(
        cls,
        registry: str,
        model_name: str = "tinynet",
        alias: Optional[str] = "champion",
        version: Optional[str] = None,
        *,
        max_pixels: Optional[int] = None,
        runtime: str = "auto",
        views: Optional[int] = None,
    ) -> Predictor:
        """Load ``version`` (or the version ``alias`` points at) from a local or s3:// registry.

        ``runtime`` "auto" uses model.onnx on onnxruntime when the version has one and
        onnxruntime is installed, else model.pt on torch; "torch" always uses model.pt.
        Either file is checked against the card's sha256 (when the card records one);
        model.pt is loaded with ``weights_only=True``; so is reference.json when the version has one.
        ``views`` replaces the card's number of test-time views (0: the single-pass score).
        """
        if runtime not in ("auto", "torch"):
            raise ValueError(f"invalid runtime {runtime!r}: choose auto or torch")
        version = resolve_version(registry, model_name, alias, version)
        try:
            card = reg.load_card(registry, model_name, version)  # links, JSON, digest, schema
        except reg.CorruptCard as error:
            raise CardError(f"refusing to load {model_name} {version}: {error}") from None
        check_card(card, f"{model_name} {version}")
        try:
            onnx, options = None, {"max_pixels": max_pixels, "views": views,
                                   "reference": load_reference(registry, model_name, version, card)}
            if runtime == "auto" and onnx_model.ONNX_NAME in card.files and onnx_model.available():
                onnx = OnnxModel(reg.read_verified(registry, model_name, version, onnx_model.ONNX_NAME, card))
            if onnx is not None:
                # model.pt is checked too: a version whose files differ from its card is refused, whichever runs.
                reg.read_verified(registry, model_name, version, "model.pt", card)
                return cls(None, card, model_name=model_name, version=version, onnx=onnx, **options)
            state_dict = reg.load_state_dict(registry, model_name, version)
        except reg.CorruptModel as error:
            raise CardError(
                f"{model_name} {version}: a file does not match the sha256, size or shape in its card; "
                f"refusing to load it ({error})"
            ) from None
        return cls(state_dict, card, model_name=model_name, version=version, **options)

    @property
    def model(self) -> dict[str, str]:
        return {"name": self.model_name, "version": self.version}

    def summary(self) -> dict[str, Any]:
        """What a client needs to know about the model being served."""
        card = self.card
        return {
            **self.model,
            "threshold": self.threshold,
            "labels": {str(k): v for k, v in self.labels.items()},
            "recipe": card.recipe,
            "created_at": card.created_at,
            "schema_version": card.schema_version,
            "transform": self.config.model_dump(mode="json"),
            "views": self.config.views.count,
            "ood_cutoff": self.ood_cutoff,
            "metrics": {
                split: {k: v for k, v in (card.metrics.get(split) or {}).items() if not isinstance(v, (dict, list))}
                for split in ("val", "test")
            },
        }

    def features(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """The image's features and its out-of-distribution warnings; ImageRejected if it is no usable image."""
        rows, warnings = self.rows(data)
        return rows[0], warnings

    def rows(self, data: bytes) -> tuple[np.ndarray, list[str]]:
        """(1 + views, n_features): the film's row, then its test-time views' (decoded once, then
        resampled); and its warnings, the distance from the training rows' among them."""
        return self.film(data)[:2]

    def film(self, data: bytes) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``rows``'s, and the share of the film's rows and of its columns trimmed as padding
        (``Resampler.borders``; 0, 0 when the transform trims nothing): the drift check's border figures."""
        borders = np.zeros(2, np.float32)
        if self.config.method == "resample":
            # featurize's own three steps, so that the picture's spread is seen before the
            # per-image z-score hides it (a test holds this equal to featurize).
            picture = Resampler(decode_gray(data, self.config), self.config)
            borders, canvas = picture.borders, picture.canvas()
            features, spread = pool_features(canvas, self.config), float(canvas.std())
            if self.config.views.count:
                viewed = views.view_features(picture, self.config, views.picture_key(picture))
                return np.concatenate([features[None], viewed]), self._warnings(data, spread, features), borders
        else:
            features = featurize(data, self.config)
            spread = float(features.std())
        return features[None], self._warnings(data, spread, features), borders

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """PNEUMONIA probabilities of rows of features: model.onnx on onnxruntime, or model.predict_proba."""
        return self.network(features)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Scores of films from their ``rows`` ((n, 1 + views, n_features)): pneumo.views.film_scores, as the card's."""
        return views.film_scores(self.probabilities, rows[:, 0], rows[:, 1:])

    def distance(self, features: np.ndarray) -> Optional[float]:
        """The film's Mahalanobis distance from the training rows, or None without a reference."""
        return None if self.reference is None else float(distances(self.reference, features)[0])

    def predict(self, inputs: Iterable[Input]) -> list[Prediction]:
        """One Prediction per input, in order; an input that cannot be scored gets its ``error``."""
        return self.predict_with_features(inputs)[0]

    def predict_with_features(self, inputs: Iterable[Input]) -> tuple[list[Prediction], np.ndarray, np.ndarray]:
        """``predict``'s, and the features of the films scored ((scored, n_features), in order) and their
        trimmed padding ((scored, 2): ``film``'s borders): what a drift check reads."""
        names, rows, results, borders = [], [], [], []
        for item in inputs:
            name, data = _read(item)
            prediction = Prediction(name, None, None, self.threshold, self.model)
            try:
                if isinstance(data, Exception):
                    raise data
                film, prediction.warnings, trimmed = self.film(data)
                prediction.distance = self.distance(film[0])
                rows.append(film)
                borders.append(trimmed)
                names.append(len(results))
            except (ImageRejected, OSError) as error:
                prediction.error = str(error) if isinstance(error, ImageRejected) else _os_error(error)
            except (ValueError, SyntaxError, EOFError) as error:  # any other decoder complaint: this input only
                prediction.error = f"unreadable image ({type(error).__name__}: {error})"
            results.append(prediction)
        if rows:
            for at, probability in zip(names, self.scores(np.stack(rows)).tolist()):
                results[at].probability = probability
                results[at].label = self.labels[int(probability >= self.threshold)]
        if not rows:
            return results, np.zeros((0, self.config.n_features), np.float32), np.zeros((0, 2), np.float32)
        return results, np.stack([film[0] for film in rows]), np.stack(borders)

    def _warnings(self, data: bytes, spread: float, features: np.ndarray) -> list[str]:
        """Why the image looks unlike the training X-rays: a header read, the picture's spread
        (of its features, or of the resampled crop), for colour images a tiny decode, and the
        features' distance from the training rows."""
        out = []
        with contextlib.ExitStack() as stack:
            if is_dicom(data[:132]):  # a gray film (colour DICOM is refused): its size from the header
                width, height, image = *header_size(io.BytesIO(data)), None
            else:
                image = stack.enter_context(open_image(io.BytesIO(data)))
                width, height = oriented_size(image)
            target_h, target_w = self.config.size
            if width < TINY_FRACTION * target_w or height < TINY_FRACTION * target_h:
                out.append(f"tiny: {width}x{height} pixels, the model's images were resized to {target_w}x{target_h}")
            ratio = (width / height) / (target_w / target_h)
            if not 1 / ASPECT_FACTOR <= ratio <= ASPECT_FACTOR:
                out.append(f"extreme aspect ratio: {width}x{height} (width/height {width / height:.2f})")
            if image is not None and image.mode not in ("L", "LA", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                levels = _colour_levels(image, data)
                if levels > COLOUR_LEVELS:
                    out.append(f"strong colour: channels differ by {levels:.0f} gray levels on average (X-rays are gray)")
        if spread < BLANK_SPREAD:
            out.append(f"nearly blank: the picture barely varies (std {spread:.3f} on a 0-1 scale)")
        ood = None if self.reference is None else reference_warning(self.reference, features)
        return out + ([ood] if ood else [])


def _read(item: Input) -> tuple[str, Union[bytes, Exception]]:
    if isinstance(item, tuple):
        return str(item[0]), bytes(item[1])
    if isinstance(item, (bytes, bytearray)):
        return f"<{len(item)} bytes>", bytes(item)
    try:
        return str(item), read_file(item)  # regular files under the size bound only
    except (OSError, ImageRejected) as error:
        return str(item), error


NO_SUCH_FILE, CANNOT_READ = "no such file", "cannot read"


def _os_error(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return NO_SUCH_FILE
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image"
    return f"{CANNOT_READ} ({error.strerror or error})"


def read_failed(error: Optional[str]) -> bool:
    """Whether a prediction's error says the file could not be read (gone, no permission) rather than what it holds:
    a later run may read it, so a result holding such an error is not one to cache."""
    return bool(error) and (error == NO_SUCH_FILE or error.startswith(CANNOT_READ + " ("))


def _colour_levels(image: Image.Image, data: bytes) -> float:
    """Mean (max - min) over the RGB channels of a small decode of the image (orientation does not matter).

    A JPEG costs a second entropy decode, which no scale skips: only its top COLOUR_ROWS are
    decoded (the frame header is read as shorter, as the transform's fast path does), at 1/8
    scale and left in YCbCr.
    """
    if image.format == "JPEG" and image.mode in ("RGB", "YCbCr"):
        top = open_top_rows(io.BytesIO(data), max(16, int(image.size[1] * COLOUR_ROWS)))
        if top is not None:
            image = top
        image.draft("YCbCr", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    else:
        image.thumbnail((128, 128))
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


# --- Inputs: files, folders, datasets ----------------------------------------------------

@dataclass(frozen=True)
class InputImage:
    relpath: str  # POSIX, relative to the listed root
    path: str
    label: Optional[int] = None  # 0 / 1 when a parent folder is named NORMAL / PNEUMONIA
    refused: Optional[str] = None  # why it is not read at all (a symlink leading out of the input)


def list_inputs(root: str | Path) -> list[InputImage]:
    """Every file under ``root`` (OS junk skipped), sorted; labelled by a NORMAL/PNEUMONIA parent folder.

    Files that are not images are listed too: scoring reports each with its reason. A symlink
    leading out of ``root`` (file or folder) is listed with ``refused`` set, as in training's
    manifest; a symlinked folder inside it is listed as not followed (its files are listed
    where they are). Nothing under ``root`` is left out without a word.
    """
    root = Path(root)
    if root.is_file():
        return [InputImage(relpath=root.name, path=str(root))]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    resolved_root = root.resolve()
    found = []

    def add(path: Path, refused: Optional[str] = None) -> None:
        relpath = path.relative_to(root)
        parents = [part for part in relpath.parts[:-1] if part in CLASSES]
        label = CLASSES.index(parents[-1]) if parents else None
        found.append(InputImage(relpath=relpath.as_posix(), path=str(path), label=label, refused=refused))

    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
        for name in [d for d in dirnames if Path(folder, d).is_symlink()]:  # os.walk does not follow them
            inside = Path(folder, name).resolve().is_relative_to(resolved_root)
            add(Path(folder, name), "symlinked folder inside the input (not followed)" if inside
                else "symlinked folder points outside the input (not read)")
        for name in sorted(filenames):
            if is_junk(name):
                continue
            path = Path(folder, name)
            outside = path.is_symlink() and not path.resolve().is_relative_to(resolved_root)
            add(path, "symlink points outside the input (not read)" if outside else None)
    return found


# --- Batch scoring (the library side of flows/predict.py) ---------------------------------


@functools.lru_cache(maxsize=4)
def cached_predictor(registry: str, model_name: str, version: str) -> Predictor:
    """One loaded model per process and version: a pool worker loads it once, not per chunk."""
    return Predictor.from_registry(registry, model_name, version=version)


def score_inputs(registry: str, model_name: str, version: str, images: list[InputImage]) -> list[dict[str, Any]]:
    """Rows for the predictions file: relpath, label truth, and the prediction (or its error)."""
    predictor = cached_predictor(registry, model_name, version)
    scored, features, borders = predictor.predict_with_features([image.path for image in images if image.refused is None])
    readable, rows = iter(scored), iter(features.round(4).tolist())  # rounded: they travel in the task's result
    trimmed = iter(borders.round(4).tolist())
    predictions = [
        next(readable) if image.refused is None
        else Prediction(image.path, None, None, predictor.threshold, predictor.model, error=image.refused)
        for image in images
    ]
    return [
        {
            "relpath": image.relpath,
            "probability": p.probability,
            "label": p.label,
            "threshold": p.threshold,
            "warnings": "; ".join(p.warnings),
            "distance": p.distance,
            "true_label": None if image.label is None else CLASSES[image.label],
            "error": p.error,
            "features": next(rows) if p.ok else None,  # for the drift check; not in the CSV
            "borders": next(trimmed) if p.ok else None,  # the padding trimmed, for the drift check; not in the CSV
        }
        for image, p in zip(images, predictions)
    ]


PREDICTION_COLUMNS = ("relpath", "probability", "label", "threshold", "warnings", "true_label", "distance")


# A cell starting with one of these is a formula to a spreadsheet (=HYPERLINK(...), +cmd|...).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text, on one line: a leading formula character gets a
    ``'`` before it (OWASP's advice), line breaks are written as ``\\n`` and ``\\r``."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def predictions_csv(rows: list[dict[str, Any]]) -> bytes:
    """The predictions file: one line per scored image (rows with an error are left out).

    File names (and any other text) go through ``safe_cell``: no formula, no line break.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if row.get("error") is None:
            writer.writerow({
                **row,
                "relpath": safe_cell(row["relpath"]),
                "warnings": safe_cell(row["warnings"]),
                "probability": f"{row['probability']:.6f}",
                "true_label": row["true_label"] or "",
                "distance": "" if row.get("distance") is None else f"{row['distance']:.2f}",
            })
    return buffer.getvalue().encode()
