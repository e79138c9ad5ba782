"""Named recipes: partial run configs, the values a recipe sets where they differ from the defaults.

- ``seed``: the faithful port of Joffreybvn/challenge-pneumonia (max-pool 10 x 14, crop 10 %,
  hinge loss, majority down-sampling, Adam 5e-5, batch 32). It reproduces the reference
  model exactly and stays the mission's baseline.
- ``robust``: features that describe the film's shape rather than its exposure (a coarser
  grid, max and mean pooling, each part z-scored per image, little crop), the train images
  joined by augmented renditions (pneumo.augment), and BCE with class weights, which keeps
  every row. Measured against ``seed`` with benchmarks/quality.py. It reads the chest's
  proportions (issue 16): with the film stretched to 1.22 of its height (the chest looks
  narrower) its val specificity falls to about 0.34.
- ``robust2``: ``robust``'s features, trained on wider renditions that also change the
  aspect ratio (so the chest's width stops being a clue) and blur, for a fixed budget of
  epochs whose weights from epoch 11 on are averaged (pneumo.train), its threshold chosen
  on the stress val (Youden's J, pneumo.evaluate). Flat bars at the film's borders are
  its weakest shift (letterbox: val AUC 0.967 in 5 seeds, sensitivity about 0.54): such
  bars go with NORMAL inside the training period.
- ``robust3``: ``robust2`` on films whose flat border bands (a scanner's
  padding) are cut before anything else (``transform.trim_padding``), at training and at
  prediction alike, so bars are no clue either.
- ``robust4``: the default. ``robust3`` trained on 48 renditions per film instead of 12 (their
  variety, not more steps, is what helps: issue 24), and every film scored as the mean over
  itself and 16 mild views (``transform.views``, pneumo.views): zoom 0.92-1.09, translation
  +-4 %, rotation +-4 degrees, aspect +-0.1, no exposure change. The views are stored in the
  card and used by every score of the version, its card's figures and threshold included.

A recipe's name is a promise: it always builds the same model. Cards record the name, so a
new version of a recipe gets a new name and the old one keeps its meaning ("robust" in a
card of last month still rebuilds that model).

All keep TinyNet within 2,541 parameters (Keras count): 140 inputs each.

The models' defaults (pneumo.config) are ``robust4``'s, so ``robust4`` is empty and each other
recipe lists what it changes (the ones before it: 12 renditions or fewer, and no views); ``RunConfig`` applies the named one under the given values
(pneumo.config: ``recipe_config``, ``recipe``, ``seed_transform``, ``seed_train``).
"""

from __future__ import annotations

from typing import Any, Literal

RecipeName = Literal["seed", "robust", "robust2", "robust3", "robust4"]
DEFAULT_RECIPE: RecipeName = "robust4"

_NO_VIEWS: dict[str, Any] = {"count": 0}  # every recipe before robust4 scores a film in one pass
_ROBUST3: dict[str, Any] = {"transform": {"renditions": 12, "views": _NO_VIEWS}}
_ROBUST2: dict[str, Any] = {"transform": {"trim_padding": False, "renditions": 12, "views": _NO_VIEWS}}
_ROBUST: dict[str, Any] = {
    "transform": {
        "trim_padding": False,
        "augment": {"zoom": (0.9, 1.12), "shift": 0.05, "rotation": 5.0, "gamma": 0.35, "contrast": 0.2,
                    "brightness": 0.06, "aspect": 0.0, "blur": 0.0},
        "renditions": 6,
        "views": _NO_VIEWS,
    },
    "train": {"epochs": 40, "swa_start": 0, "threshold_rule": "fixed"},
}
_SEED: dict[str, Any] = {
    "transform": {
        "method": "fast", "grid": (10, 14), "pooling": ("max",), "normalize": "none", "crop_fraction": 0.10,
        "cell_pixels": 16, "trim_padding": False, "renditions": 0, "views": _NO_VIEWS,
        "augment": {"zoom": (1.0, 1.0), "shift": 0.0, "rotation": 0.0, "gamma": 0.0, "contrast": 0.0,
                    "brightness": 0.0, "aspect": 0.0, "blur": 0.0},
    },
    "train": {"epochs": 1000, "batch_size": 32, "lr": 5e-5, "loss": "hinge", "balance": "downsample", "patience": 100,
              "threshold_rule": "fixed", "weight_decay": 0.0, "swa_start": 0},
}
RECIPES: dict[str, dict[str, Any]] = {"seed": _SEED, "robust": _ROBUST, "robust2": _ROBUST2, "robust3": _ROBUST3, "robust4": {}}
