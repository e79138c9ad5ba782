"""The training rows' features in brief: how far a new film lies from them, and their quantiles.

A ``Reference`` is built at registration from the rows the version was trained on (every
train film and its renditions) and stored beside the model as ``reference.json``, listed in
the card's ``files`` like model.pt, so the card's integrity covers it (``load_reference``).

- ``distances``: the Mahalanobis distance of rows of features from the training rows' mean,
  under a shrunk covariance (scikit-learn's Ledoit-Wolf: 140 features z-scored per image
  make the plain covariance nearly singular). ``ood_cutoff`` is the 99.9th percentile of the
  training rows' own distances: a film beyond it is unlike every film the model learned
  from (a page of text, noise, a plain gradient), and prediction says so (pneumo.predict).
- ``feature_quantiles`` and ``score_quantiles``: the 0, 5, ..., 100 % quantiles of each
  feature over the training films and of the val scores, for drift checks (pneumo.drift).
  The films are the train images themselves (rendition 0), not their augmented renditions:
  a batch of new films is compared with films, and the renditions are wider by design.
- for the drift checks too: the films' mean and shrunk precision (``film_mean``,
  ``film_precision``: a Hotelling test of a batch's mean; the rows' precision would hide the
  directions the renditions vary along, which are those blur and gamma move), and the val
  films' distances (``distance_quantiles``) and share past the cut-off (``ood_share``).
  Distances of held-out films run longer than the training rows' own, so they are the yardstick.

JSON only, never pickle. The precision matrix is stored as its upper triangle, scaled by
its diagonal to [-1, 1] and rounded to int16 (base64); the films' precision likewise in int8,
and the feature quantiles as uint8 steps between each feature's minimum and maximum, which
keeps the file under 50 KB. The rounding moves a distance by well under 0.1 %
(tests/code/test_reference.py) and the drift figures by less than their noise
(benchmarks/drift.py checks with the stored form).
"""

from __future__ import annotations

import base64
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
        description="feature_quantiles[q][f]: quantile level quantile_levels[q] of feature f over the training films"
    )
    score_quantiles: Optional[list[float]] = Field(None, description="The val scores' quantiles at quantile_levels")
    # For pneumo.drift (None in references built before it).
    n_films: Optional[int] = Field(None, ge=1, description="Training films (rendition 0) of feature_quantiles and film_mean")
    film_mean: Optional[list[float]] = None
    film_precision: Optional[list[list[float]]] = Field(None, description="Inverse of the films' Ledoit-Wolf covariance")
    n_val: Optional[int] = Field(None, ge=1, description="Val films behind score_quantiles, distance_quantiles, ood_share")
    distance_quantiles: Optional[list[float]] = Field(None, description="The val films' distances at quantile_levels")
    ood_share: Optional[float] = Field(None, ge=0, le=1, description="Share of the val films past ood_cutoff")

    @field_serializer("precision", when_used="json")
    def _packed(self, precision: list[list[float]]) -> dict[str, Any]:
        return pack_symmetric(precision, "i2", 7)

    @field_validator("precision", mode="before")
    @classmethod
    def _unpacked(cls, value: Any) -> Any:
        return unpack_symmetric(value, "i2") if isinstance(value, dict) else value

    @field_serializer("film_precision", when_used="json")
    def _packed_films(self, precision: Optional[list[list[float]]]) -> Optional[dict[str, Any]]:
        return None if precision is None else pack_symmetric(precision, "i1", 4)

    @field_validator("film_precision", mode="before")
    @classmethod
    def _unpacked_films(cls, value: Any) -> Any:
        return unpack_symmetric(value, "i1") if isinstance(value, dict) else value

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

    @field_validator("feature_quantiles", "precision", "film_precision")
    @classmethod
    def _finite(cls, value: Optional[list[list[float]]]) -> Optional[list[list[float]]]:
        if value is not None and not np.isfinite(np.asarray(value, dtype=np.float64)).all():
            raise ValueError("holds values that are not finite")
        return value

    @property
    def n_features(self) -> int:
        return len(self.mean)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Reference":
        """The reference of ``to_json``'s bytes; pydantic's ValidationError (a ValueError) when they are not one."""
        return cls.model_validate_json(data)


def pack_symmetric(matrix: Any, dtype: str, digits: int) -> dict[str, Any]:
    """A symmetric positive definite matrix as its diagonal's square roots (``digits`` significant digits) and
    its upper triangle above the diagonal, scaled by them to [-1, 1] (the diagonal is then 1) and rounded to the
    integers of ``dtype`` ("i1", "i2"), base64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    top = np.iinfo(dtype).max
    scale = np.sqrt(np.diag(matrix))
    upper = np.clip((matrix / np.outer(scale, scale))[np.triu_indices(len(matrix), 1)], -1, 1)
    return {"scale": [float(f"{v:.{digits}g}") for v in scale],
            f"upper_{np.dtype(dtype).name}_base64": base64.b64encode(np.round(upper * top).astype(dtype).tobytes()).decode()}


def unpack_symmetric(value: dict[str, Any], dtype: str) -> list[list[float]]:
    scale = np.asarray(value["scale"], dtype=np.float64)
    n, top = len(scale), np.iinfo(dtype).max
    upper = np.frombuffer(base64.b64decode(value[f"upper_{np.dtype(dtype).name}_base64"], validate=True), dtype=dtype)
    if len(upper) != n * (n - 1) // 2:
        raise ValueError(f"a matrix of {len(upper)} values, not the {n * (n - 1) // 2} above the diagonal of {n} x {n}")
    normalized = np.eye(n)
    normalized[np.triu_indices(n, 1)] = upper / top
    normalized = normalized + np.triu(normalized, 1).T
    return (normalized * np.outer(scale, scale)).tolist()


def _rounded(values: np.ndarray, decimals: int = 4) -> list:
    return np.round(np.asarray(values, dtype=np.float64), decimals).tolist()


def build(
    train_features: np.ndarray,
    val_scores: Optional[np.ndarray] = None,
    *,
    films: Optional[np.ndarray] = None,
    val_features: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Reference:
    """The reference of ``train_features`` (rows x features), with the quantiles of ``val_scores`` if given.

    ``films``: the train images' own rows (no renditions; default: ``train_features``), for the
    drift figures; ``val_features``: the val films' rows (those of ``val_scores``), for the distances."""
    from sklearn.covariance import LedoitWolf  # here: prediction reads a reference without scikit-learn

    X = np.asarray(train_features, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"need at least two rows of features, got an array of shape {X.shape}")
    F = X if films is None else np.asarray(films, dtype=np.float64)
    fit_rows = X if len(X) <= MAX_FIT_ROWS else X[np.random.default_rng(seed).choice(len(X), MAX_FIT_ROWS, replace=False)]
    covariance = LedoitWolf(assume_centered=False).fit(fit_rows).covariance_
    reference = Reference(
        n_rows=len(X),
        mean=_rounded(X.mean(axis=0), 6),
        precision=np.linalg.inv(covariance).tolist(),
        ood_cutoff=1.0,  # set below, from the stored (rounded) precision: what prediction will use
        feature_quantiles=_rounded(np.percentile(F, QUANTILE_LEVELS, axis=0), 3),
        score_quantiles=None if val_scores is None else _rounded(np.percentile(np.asarray(val_scores, float), QUANTILE_LEVELS), 6),
    )
    stored = Reference.from_json(reference.to_json())
    cutoff = round(float(np.percentile(distances(stored, X), CUTOFF_QUANTILE)), 4)
    n_val = {} if val_scores is None else {"n_val": len(val_scores)}
    complete = stored.model_copy(update={"ood_cutoff": cutoff, **n_val, **_drift_fields(stored, F, cutoff, val_features)})
    return Reference.from_json(complete.to_json())  # as stored: what a check will read


def _drift_fields(ref: Reference, films: np.ndarray, cutoff: float, val_features: Optional[np.ndarray]) -> dict[str, Any]:
    """The films' mean and precision, and the val films' distances: what pneumo.drift calibrates on."""
    from sklearn.covariance import LedoitWolf

    fields: dict[str, Any] = {
        "n_films": len(films), "film_mean": _rounded(films.mean(axis=0), 4),
        "film_precision": np.linalg.inv(LedoitWolf().fit(films).covariance_).tolist(),
    }
    if val_features is not None and len(val_features):
        d = distances(ref, val_features)
        fields.update(n_val=len(d), distance_quantiles=_rounded(np.percentile(d, QUANTILE_LEVELS), 4),
                      ood_share=round(float(np.mean(d > cutoff)), 6))
    return fields


def distances(ref: Reference, X: np.ndarray) -> np.ndarray:
    """The Mahalanobis distance of each row of ``X`` (or of one row) from the training rows."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[1] != ref.n_features:
        raise ValueError(f"rows have {X.shape[1]} features, the reference {ref.n_features}")
    centred = X - np.asarray(ref.mean)
    squared = ((centred @ np.asarray(ref.precision)) * centred).sum(axis=1)  # einsum: 7x slower
    return np.sqrt(np.maximum(squared, 0.0))


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
