"""Named recipes: a transform and a training config that belong together.

- ``seed``: the faithful port of Joffreybvn/challenge-pneumonia (max-pool 10 x 14, crop 10 %,
  hinge loss, majority down-sampling, Adam 5e-5, batch 32). It reproduces the reference
  model exactly and stays the mission's baseline.
- ``robust``: the default. Features that describe the film's shape rather than its exposure
  (a coarser grid, max and mean pooling, each part z-scored per image, little crop), the
  train images joined by augmented renditions (pneumo.augment), and BCE with class weights,
  which keeps every row. Measured against ``seed`` with benchmarks/quality.py.

Both keep TinyNet within 2,541 parameters (Keras count): 140 inputs each.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pneumo.config import AugmentConfig, TrainConfig, TransformConfig

RecipeName = Literal["seed", "robust"]
DEFAULT_RECIPE: RecipeName = "robust"


class Recipe(NamedTuple):
    transform: TransformConfig
    train: TrainConfig


RECIPES: dict[str, Recipe] = {
    "seed": Recipe(TransformConfig(), TrainConfig()),
    "robust": Recipe(
        TransformConfig(
            method="resample",
            grid=(7, 10),
            pooling=("max", "mean"),  # 2 x 70 = 140 inputs, TinyNet's 2,541 parameters
            normalize="zscore",
            crop_fraction=0.02,
            cell_pixels=8,  # a 56 x 80 canvas: K = 6 renditions cost about one more decode
            augment=AugmentConfig(zoom=(0.9, 1.12), shift=0.05, rotation=5.0, gamma=0.35, contrast=0.2, brightness=0.06),
            renditions=6,
        ),
        TrainConfig(
            loss="bce",
            balance="class_weights",
            weight_decay=1e-4,
            batch_size=128,
            lr=1e-3,
            epochs=40,
            patience=10,
        ),
    ),
}


def recipe(name: str) -> Recipe:
    """The named recipe; a clear error for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
