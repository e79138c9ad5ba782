"""Typed configuration. The defaults reproduce the seed (Joffreybvn/challenge-pneumonia)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KAGGLE_DEFAULT_SOURCE = "kaggle:paultimothymooney/chest-xray-pneumonia"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """A stable sha256 of the config, for keys and file names."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()


class AugmentConfig(_Config):
    """Ranges of the random renditions of train images (pneumo.augment); the defaults change nothing.

    Each rendition draws every parameter uniformly from its range: zoom in [zoom[0], zoom[1]]
    (> 1 magnifies), translation up to +-``shift`` of the width and height, rotation up to
    +-``rotation`` degrees, gamma e^u with u in +-``gamma``, contrast about the image mean
    e^u with u in +-``contrast``, brightness +-``brightness`` on the [0, 1] scale.
    ``aspect`` stretches one axis against the other (zoom_x = zoom e^u, zoom_y = zoom e^-u,
    u in +-``aspect``), so that the chest's width stops being a clue; ``blur`` is the share of
    renditions blurred, with sigma in ``blur_sigma`` (fractions of the film's short side).
    """

    zoom: tuple[float, float] = Field((1.0, 1.0), description="Zoom factor range; 0.9 shows more of the film, 1.12 less")
    shift: float = Field(
        0.0,
        ge=0.0,
        le=0.25,
        # The name 'shift' stays because cards store it; pneumo.augment says translate_x/translate_y.
        description="Largest translation, as a fraction of width and height",
    )
    rotation: float = Field(0.0, ge=0.0, le=30.0, description="Largest rotation in degrees")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="Largest |log gamma|")
    contrast: float = Field(0.0, ge=0.0, le=1.0, description="Largest |log contrast| about the image mean")
    brightness: float = Field(0.0, ge=0.0, le=0.5, description="Largest brightness offset on the [0, 1] scale")
    aspect: float = Field(0.0, ge=0.0, le=0.5, description="Largest |log| of the aspect change: zoom_x = zoom e^u, zoom_y = zoom e^-u")
    blur: float = Field(0.0, ge=0.0, le=1.0, description="Share of renditions blurred (Gaussian)")
    blur_sigma: tuple[float, float] = Field(
        (0.005, 0.015), description="Blur sigma range, as fractions of the film's short side"
    )

    @field_validator("zoom")
    @classmethod
    def _zoom_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.5 <= value[0] <= value[1] <= 2.0:
            raise ValueError(f"zoom must be (low, high) with 0.5 <= low <= high <= 2, got {value}")
        return value

    @field_validator("blur_sigma")
    @classmethod
    def _blur_sigma_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1] <= 0.1:
            raise ValueError(f"blur_sigma must be (low, high) with 0 <= low <= high <= 0.1, got {value}")
        return value


class TransformConfig(_Config):
    """The image recipe. The defaults are the seed's: resize, crop borders, gray [0, 1], max-pool, flatten."""

    size: tuple[int, int] = Field(
        (1000, 1300), description="(height, width) every image is resized to; the pipeline sets it from the size percentile"
    )
    crop_fraction: float = Field(0.10, ge=0.0, lt=0.5, description="Fraction cut from each border after resizing")
    grid: tuple[int, int] = Field((10, 14), description="Rows and columns of the pooling grid; features = rows * cols per pooling part")
    method: Literal["fast", "exact", "resample"] = Field(
        "fast",
        description="'exact' decodes full resolution; 'fast' decodes at a reduced JPEG scale (max pooling only); "
        "'resample' resamples the crop to cell_pixels per cell: needed for mean pooling, normalization and renditions",
    )
    pooling: tuple[Literal["max", "mean"], ...] = Field(
        ("max",), description="Pooling parts, concatenated in this order (repeat the option: --pooling max --pooling mean); features = rows * cols * parts"
    )
    normalize: Literal["none", "zscore"] = Field("none", description="'zscore': each pooling part scaled to mean 0, sd 1 per image")
    cell_pixels: int = Field(16, ge=2, le=64, description="'resample': pixels per cell side of the resampled crop")
    trim_padding: bool = Field(
        False, description="'resample': cut flat bands (a scanner's or viewer's padding) off the picture's borders before the crop"
    )
    augment: AugmentConfig = Field(AugmentConfig(), description="Ranges of the train renditions")
    renditions: int = Field(0, ge=0, le=32, description="Augmented renditions stored per train image beside the original; 0 = off")
    augment_seed: int = Field(0, ge=0, description="Seeds the renditions, with each image's sha256 and the rendition number")
    shift_suite: bool = Field(True, description="Store val and test features under the acquisition shifts of pneumo.shift")
    shift_seed: int = Field(0, ge=0, description="Seeds the shift suite's random parts (shift direction, border widths, noise)")
    max_pixels: int = Field(
        50_000_000, gt=0, description="Images with more pixels are refused (decompression-bomb guard); X-rays are under 10 MP"
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
        resample_only = self.pooling != ("max",) or self.normalize != "none" or self.renditions or self.trim_padding
        if self.method != "resample" and resample_only:
            raise ValueError(
                f"method {self.method!r} computes the seed's max-pool features only; "
                "use method='resample' for mean pooling, normalization, renditions or trimmed padding"
            )
        return self

    @property
    def n_features(self) -> int:
        return self.grid[0] * self.grid[1] * len(self.pooling)

    def row_settings(self) -> dict:
        """The settings that decide an image's own row, what prediction computes: all but the train
        renditions and the shift suite. Models with equal row settings read each other's val rows."""
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
        "(re-encoded/resized copies: <= 74 bits; distinct films: >= 153 on the shared data)",
    )


class TrainConfig(_Config):
    """TinyNet training: the seed's optimizer, loss and batch size, with early stopping."""

    epochs: int = Field(1000, ge=1, description="Maximum number of epochs")
    batch_size: int = Field(32, ge=1, description="Training rows per optimizer step")
    lr: float = Field(5e-5, gt=0.0, description="Learning rate of the optimizer: AdamW, or the seed's plain Adam when --weight-decay is 0")
    loss: Literal["hinge", "bce"] = Field("hinge", description="'hinge': the seed's Keras-style hinge on the sigmoid output; 'bce': binary cross-entropy")
    balance: Literal["downsample", "class_weights", "none"] = Field(
        "downsample", description="Class imbalance of train: 'downsample' the majority class, 'class_weights' in the loss, or 'none'"
    )
    patience: int = Field(100, ge=1, description="Epochs without a better validation loss before stopping")
    seed: int = Field(0, description="Seeds sampling, initialisation and shuffling")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Decision threshold for the reported metrics")
    threshold_rule: Literal["fixed", "stress_youden"] = Field(
        "fixed", description="'fixed': use threshold; 'stress_youden': the threshold that maximizes Youden's J "
        "(sensitivity + specificity - 1) on the stress val"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay; 0 keeps the seed's plain Adam")
    swa_start: int = Field(
        0, ge=0, description="Average the weights of every epoch from this one on (SWA; from the last epoch if the "
        "budget is shorter) and train all epochs; 0 = off: keep the best validation-loss epoch"
    )
