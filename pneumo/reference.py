"""The training rows' features in brief: how far a new film lies from them, and their quantiles.

A ``Reference`` is built at registration from the rows of the films the version was trained on
(each train film's own row: the renditions are synthetic, and with them in, a page of text
fell inside the cut-off: distance 20.4 against 24.8) and stored beside the model as
``reference.json``, listed in the card's ``files`` like model.pt, so the card's integrity
covers it (``load_reference``).

- ``distances``: the Mahalanobis distance of rows of features from the training rows' mean,
  under a shrunk covariance (scikit-learn's Ledoit-Wolf: 140 features z-scored per image
  make the plain covariance nearly singular). ``ood_cutoff`` is the 99.9th percentile of the
  training rows' own distances: a film beyond it is unlike every film the model learned
  from (a page of text, noise, blobs, an 8 x 8 picture), and prediction says so (pneumo.predict).
- ``slopes``: how much of a row's brightness layout (its mean-pooled cells) one plain slope
  explains (R^2 of a plane fit). The per-image z-score makes a gradient look like a film lit
  unevenly, so its distance stays among the films' (10.6-20.8 measured); but no film is a plane
  (R^2 at most 0.67 over the 5,216 shared films, 1.0 for a gradient). ``slope_cutoff`` is the
  99.9th percentile of the training rows' R^2.
- ``feature_quantiles`` and ``score_quantiles``: the 0, 5, ..., 100 % quantiles of each
  feature over the training rows and of the val scores, for drift checks (pneumo.drift).
- for the drift checks too, from the val films (held out, so the yardstick for new films:
  the training rows' own distances run shorter): the quantiles of their distances
  (``distance_quantiles``) and their share past the cut-off (``ood_share``); ``n_val`` films.
  The feature quantiles are stored as uint8 steps between each feature's minimum and maximum
  (a KS distance moves by well under 0.01), which keeps the file well under 50 KB.
- for the drift check's border test, with a recipe that trims padding (``transform.trim_padding``:
  a barred film's features are the film's own): over the training films, the share with rows
  trimmed and the share with columns trimmed (``border_shares``), and the quantiles of the
  trimmed share of rows and of columns (``border_quantiles``); ``n_border_films`` films.
  None in references built before the test, or by a recipe that trims nothing.

JSON only, never pickle. The precision matrix is stored as its upper triangle, scaled by
its diagonal to [-1, 1] and rounded to int16 (base64), which keeps the file under 50 KB; the
rounding moves a distance by under 0.5 % (0.2 % at most on the shared data; tests/code/test_reference.py),
and the cut-off is computed with the stored matrix, as prediction uses it.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

REFERENCE_NAME = "reference.json"  # its file name in a version's folder
SCHEMA_VERSION = 1
CUTOFF_QUANTILE = 99.9  # percent of the training rows inside the cut-off
QUANTILE_LEVELS = tuple(range(0, 101, 5))  # percent: 21 levels
# Rows the covariance and the quantiles are computed on: a random subset beyond (a 140 x 140 matrix
# is settled long before; 191,000 rows of robust4 would take ~15 s). The cut-off uses every row.
MAX_FIT_ROWS = 50_000
_INT16 = 32767
_BORDER_FIELDS = ("n_border_films", "border_shares", "border_quantiles")


class Reference(BaseModel):
    """The training rows' features: mean, shrunk precision, distance cut-off, quantiles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    n_rows: int = Field(ge=1, description="Training rows it was built from")
    mean: list[float]
    precision: list[list[float]] = Field(description="Inverse of the Ledoit-Wolf covariance")
    ood_cutoff: float = Field(gt=0, description=f"The {CUTOFF_QUANTILE}th percentile of the training rows' distances")
    cutoff_quantile: float = CUTOFF_QUANTILE
    quantile_levels: list[int] = list(QUANTILE_LEVELS)
    feature_quantiles: list[list[float]] = Field(
        description="feature_quantiles[q][f]: quantile level quantile_levels[q] of feature f over the training rows"
    )
    score_quantiles: Optional[list[float]] = Field(None, description="The val scores' quantiles at quantile_levels")
    # For pneumo.drift (None in references built before it).
    n_val: Optional[int] = Field(None, ge=1, description="Val films behind score_quantiles, distance_quantiles, ood_share")
    distance_quantiles: Optional[list[float]] = Field(None, description="The val films' distances at quantile_levels")
    ood_share: Optional[float] = Field(None, ge=0, le=1, description="Share of the val films past ood_cutoff")
    grid: Optional[tuple[int, int]] = Field(None, description="Rows and columns of a pooling part (the slope check's layout)")
    slope_part: int = Field(0, ge=0, description="Which pooling part the slope check reads (the mean-pooled one)")
    slope_cutoff: Optional[float] = Field(None, description=f"The {CUTOFF_QUANTILE}th percentile of the training rows' slope R^2")
    # For pneumo.drift's border test (None in references built before it, or without trim_padding).
    n_border_films: Optional[int] = Field(None, ge=1, description="Training films behind border_shares and border_quantiles")
    border_shares: Optional[tuple[float, float]] = Field(
        None, description="Share of the training films with rows trimmed as padding, and with columns trimmed")
    border_quantiles: Optional[tuple[list[float], list[float]]] = Field(
        None, description="The training films' trimmed share of rows, and of columns, at quantile_levels")

    @field_validator("border_shares")
    @classmethod
    def _shares(cls, value: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if value is not None and not all(0.0 <= v <= 1.0 for v in value):
            raise ValueError(f"border shares must lie in [0, 1], got {value}")
        return value

    @field_serializer("precision", when_used="json")
    def _packed(self, precision: list[list[float]]) -> dict[str, Any]:
        matrix = np.asarray(precision, dtype=np.float64)
        scale = np.sqrt(np.diag(matrix))
        normalized = matrix / np.outer(scale, scale)  # |entries| <= 1 for a positive definite matrix
        upper = np.round(np.clip(normalized[np.triu_indices(len(matrix))], -1, 1) * _INT16).astype("<i2")
        return {"scale": [float(f"{v:.7g}") for v in scale], "upper_int16_base64": base64.b64encode(upper.tobytes()).decode()}

    @field_validator("precision", mode="before")
    @classmethod
    def _unpacked(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        scale = np.asarray(value["scale"], dtype=np.float64)
        n = len(scale)
        upper = np.frombuffer(base64.b64decode(value["upper_int16_base64"], validate=True), dtype="<i2")
        if len(upper) != n * (n + 1) // 2:
            raise ValueError(f"precision holds {len(upper)} values, not the {n * (n + 1) // 2} of a {n} x {n} triangle")
        normalized = np.zeros((n, n))
        normalized[np.triu_indices(n)] = upper / _INT16
        normalized = normalized + np.triu(normalized, 1).T
        return (normalized * np.outer(scale, scale)).tolist()

    @field_serializer("feature_quantiles", when_used="json")
    def _packed_quantiles(self, quantiles: list[list[float]]) -> dict[str, Any]:
        q = np.asarray(quantiles, dtype=np.float64)  # (levels, features), each column ascending
        low, high = np.round(q[0], 3), np.round(q[-1], 3)
        steps = np.round((q[1:-1] - low) / np.where(high > low, high - low, 1.0) * 255)  # the inner levels
        return {"low": low.tolist(), "high": high.tolist(),
                "uint8_base64": base64.b64encode(np.clip(steps, 0, 255).astype(np.uint8).tobytes()).decode()}

    @field_validator("feature_quantiles", mode="before")
    @classmethod
    def _unpacked_quantiles(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        low, high = np.asarray(value["low"], dtype=np.float64), np.asarray(value["high"], dtype=np.float64)
        steps = np.frombuffer(base64.b64decode(value["uint8_base64"], validate=True), dtype=np.uint8)
        if len(low) != len(high) or not len(low) or len(steps) % len(low):
            raise ValueError(f"feature quantiles of {len(steps)} steps do not fit {len(low)} features")
        inner = low + steps.reshape(-1, len(low)) / 255 * (high - low)
        return np.concatenate([low[None], inner, high[None]]).tolist()

    @field_validator("feature_quantiles", "precision")
    @classmethod
    def _finite(cls, value: list[list[float]]) -> list[list[float]]:
        if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
            raise ValueError("holds values that are not finite")
        return value

    @property
    def n_features(self) -> int:
        return len(self.mean)

    @functools.cached_property
    def converted(self) -> tuple[list[float], list[list[float]], np.ndarray, np.ndarray]:
        """The ``mean`` and ``precision`` lists and their float64 arrays, converted once (``arrays``)."""
        return self.mean, self.precision, np.asarray(self.mean, dtype=np.float64), np.asarray(self.precision, dtype=np.float64)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``mean`` and ``precision`` as float64 arrays: converting the 140 x 140 list took ~0.7 ms, twice per film
        scored (its distance, its warning), 20x the distance itself. Converted again for a copy that changed them."""
        mean, precision, *arrays = self.converted
        if mean is self.mean and precision is self.precision:
            return arrays[0], arrays[1]
        return np.asarray(self.mean, dtype=np.float64), np.asarray(self.precision, dtype=np.float64)

    def to_json(self) -> bytes:
        data = self.model_dump(mode="json")
        for key in _BORDER_FIELDS:  # without them, the bytes of the references written before the border test
            if data[key] is None:
                del data[key]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Reference":
        """The reference of ``to_json``'s bytes; pydantic's ValidationError (a ValueError) when they are not one."""
        return cls.model_validate_json(data)


def _rounded(values: np.ndarray, decimals: int = 4) -> list:
    return np.round(np.asarray(values, dtype=np.float64), decimals).tolist()


def build(
    train_features: np.ndarray, val_scores: Optional[np.ndarray] = None, *, grid: Optional[tuple[int, int]] = None,
    slope_part: int = 0, val_features: Optional[np.ndarray] = None, seed: int = 0,
    train_borders: Optional[np.ndarray] = None,
) -> Reference:
    """The reference of ``train_features`` (rows x features), with the quantiles of ``val_scores`` if given;
    with ``grid`` (a pooling part's rows and columns; ``slope_part``: which part), the slope check too;
    with ``val_features`` (the rows of the val films ``val_scores`` scored), the drift check's distances;
    with ``train_borders`` ((films, 2): each training film's trimmed share of rows and of columns,
    pneumo.transform.Resampler.borders), the drift check's border figures."""
    from sklearn.covariance import LedoitWolf  # here: prediction reads a reference without scikit-learn

    X = np.asarray(train_features, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"need at least two rows of features, got an array of shape {X.shape}")
    fit_rows = X if len(X) <= MAX_FIT_ROWS else X[np.random.default_rng(seed).choice(len(X), MAX_FIT_ROWS, replace=False)]
    covariance = LedoitWolf(assume_centered=False).fit(fit_rows).covariance_
    reference = Reference(
        n_rows=len(X),
        mean=_rounded(X.mean(axis=0), 6),
        precision=np.linalg.inv(covariance).tolist(),
        ood_cutoff=1.0,  # set below, from the stored (rounded) precision: what prediction will use
        feature_quantiles=_rounded(np.percentile(fit_rows, QUANTILE_LEVELS, axis=0), 3),
        score_quantiles=None if val_scores is None else _rounded(np.percentile(np.asarray(val_scores, float), QUANTILE_LEVELS), 6),
        grid=grid,
        slope_part=slope_part,
    )
    stored = Reference.from_json(reference.to_json())
    cutoff = float(np.percentile(distances(stored, X), CUTOFF_QUANTILE))
    slope = None if grid is None else round(float(np.percentile(slopes(stored, X), CUTOFF_QUANTILE)), 4)
    update: dict[str, Any] = {"ood_cutoff": round(cutoff, 4), "slope_cutoff": slope}
    if val_scores is not None:
        update["n_val"] = len(val_scores)
    if val_features is not None and len(val_features):
        d = distances(stored, val_features)
        update.update(n_val=len(d), distance_quantiles=_rounded(np.percentile(d, QUANTILE_LEVELS), 4),
                      ood_share=round(float(np.mean(d > update["ood_cutoff"])), 6))
    if train_borders is not None:
        update.update(border_figures(train_borders))
    return Reference.from_json(stored.model_copy(update=update).to_json())  # as stored: what a check will read


def border_figures(train_borders: np.ndarray) -> dict[str, Any]:
    """The reference's border fields from the training films' (films, 2) trimmed shares of rows and columns."""
    b = np.asarray(train_borders, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 2 or not len(b) or not np.isfinite(b).all() or (b < 0).any() or (b > 1).any():
        raise ValueError(f"borders must be (films, 2) shares in [0, 1], got an array of shape {b.shape}")
    return {"n_border_films": len(b), "border_shares": tuple(round(float(v), 6) for v in (b > 0).mean(axis=0)),
            "border_quantiles": tuple(_rounded(np.percentile(b[:, axis], QUANTILE_LEVELS), 4) for axis in (0, 1))}


def distances(ref: Reference, X: np.ndarray) -> np.ndarray:
    """The Mahalanobis distance of each row of ``X`` (or of one row) from the training rows."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[1] != ref.n_features:
        raise ValueError(f"rows have {X.shape[1]} features, the reference {ref.n_features}")
    mean, precision = ref.arrays()
    centred = X - mean
    squared = ((centred @ precision) * centred).sum(axis=1)  # einsum: 7x slower
    return np.sqrt(np.maximum(squared, 0.0))


def slopes(ref: Reference, X: np.ndarray) -> np.ndarray:
    """R^2 of a plane fitted to each row's ``slope_part`` laid out on ``grid``: 1 for a plain gradient."""
    if ref.grid is None:
        raise ValueError("this reference has no grid: it was built without the slope check")
    rows, cols = ref.grid
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    part = X[:, ref.slope_part * rows * cols : (ref.slope_part + 1) * rows * cols]
    yy, xx = np.mgrid[0:rows, 0:cols]
    design = np.c_[np.ones(rows * cols), xx.ravel(), yy.ravel()]
    fitted = part @ np.linalg.pinv(design).T @ design.T  # each row's least-squares plane
    total = part.var(axis=1)
    return np.where(total > 1e-12, 1 - (part - fitted).var(axis=1) / np.maximum(total, 1e-12), 0.0)


def warning(ref: Reference, features: np.ndarray) -> Optional[str]:
    """The out-of-distribution warning of one row of features, or None when it looks like the training films."""
    distance = float(distances(ref, features)[0])
    if distance > ref.ood_cutoff:
        return (f"out of distribution: unlike the training films (distance {distance:.1f}, cut-off "
                f"{ref.ood_cutoff:.1f}); the score means little")
    if ref.slope_cutoff is not None:
        slope = float(slopes(ref, features)[0])
        if slope > ref.slope_cutoff:
            return (f"out of distribution: its brightness is a plain slope (R^2 {slope:.2f}; the training films "
                    f"up to {ref.slope_cutoff:.2f}); the score means little")
    return None


def load_reference(registry: str, model_name: str, version: str, card: Any = None) -> Optional[Reference]:
    """The reference stored with ``version``, checked against its card's sha256; None for a version
    registered before references existed. CorruptModel when the file differs from its card or is no reference."""
    from pneumo import registry as reg

    card = card if card is not None else reg.load_card(registry, model_name, version)
    if REFERENCE_NAME not in (card.files or {}):
        return None
    data = reg.read_verified(registry, model_name, version, REFERENCE_NAME, card)
    try:
        return Reference.from_json(data)
    except ValueError as error:
        raise reg.CorruptModel(f"{model_name} {version}: {REFERENCE_NAME} is not a reference: {str(error).splitlines()[0]}") from None
