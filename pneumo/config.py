"""Typed configuration. The defaults reproduce the seed (Joffreybvn/challenge-pneumonia)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

KAGGLE_DEFAULT_SOURCE = "kaggle:paultimothymooney/chest-xray-pneumonia"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """A stable sha256 of the config, for keys and file names."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()


class TransformConfig(_Config):
    """The seed's image recipe: resize, crop borders, gray [0, 1], max-pool, flatten."""

    size: tuple[int, int] = Field(
        (1000, 1300), description="(height, width) every image is resized to; the pipeline sets it from the size percentile"
    )
    crop_fraction: float = Field(0.10, ge=0.0, lt=0.5, description="Fraction cut from each border after resizing")
    grid: tuple[int, int] = Field((10, 14), description="(rows, cols) of the max-pool grid; features = rows * cols")
    method: Literal["fast", "exact"] = Field(
        "fast", description="'exact' decodes full resolution; 'fast' decodes at a reduced DCT scale first"
    )
    max_pixels: int = Field(
        50_000_000, gt=0, description="Images with more pixels are refused (decompression-bomb guard); X-rays are under 10 MP"
    )

    @field_validator("size", "grid")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"must be two positive integers, got {value}")
        return value

    @property
    def n_features(self) -> int:
        return self.grid[0] * self.grid[1]


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


class TrainConfig(_Config):
    """TinyNet training: the seed's optimizer, loss and batch size, with early stopping."""

    epochs: int = Field(1000, ge=1, description="Maximum number of epochs")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0.0, description="Adam learning rate")
    loss: Literal["hinge", "bce"] = Field("hinge", description="Keras-style hinge on the sigmoid output, or binary cross-entropy")
    balance: Literal["downsample", "class_weights", "none"] = Field(
        "downsample", description="How the class imbalance of train is handled"
    )
    patience: int = Field(100, ge=1, description="Epochs without a better validation loss before stopping")
    seed: int = Field(0, description="Seeds sampling, initialisation and shuffling")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Decision threshold for the reported metrics")
