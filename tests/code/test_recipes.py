"""Named recipes: within TinyNet's 2,541 parameters, seed unchanged, explicit options override the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumo.config import RunConfig, TrainConfig, TransformConfig
from pneumo.model import TinyNet, keras_parameter_count
from pneumo.recipes import DEFAULT_RECIPE, RECIPES
from pneumo.config import recipe_config, recipe, seed_train, seed_transform
from pneumo.transform import featurize

FIXTURE = Path(__file__).parent / "fixtures" / "seed_features.json"
RESOLVED = Path(__file__).parent / "fixtures" / "resolved_recipes.json"  # main at 9f514c2, before recipes were partial


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_fits_in_2541_parameters(name):
    transform, _ = recipe(name)
    model = TinyNet(n_features=transform.n_features)
    assert keras_parameter_count(model) <= 2541


def test_the_seed_recipe_is_the_seed():
    transform, train = recipe("seed")
    assert transform == seed_transform() and train == seed_train()
    assert (transform.method, transform.grid, transform.crop_fraction, transform.pooling) == ("fast", (10, 14), 0.10, ("max",))
    assert (train.loss, train.balance, train.lr, train.batch_size, train.weight_decay) == ("hinge", "downsample", 5e-5, 32, 0.0)
    assert transform.renditions == 0
    assert DEFAULT_RECIPE in RECIPES and DEFAULT_RECIPE != "seed"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("nope")


def test_robust_and_robust2_keep_what_their_cards_say_and_robust3_is_the_default():
    """Cards name their recipe: "robust" must keep building last month's model, the new version has its own name."""
    old, old_train = recipe("robust")
    assert old.augment.model_dump() == {
        "zoom": (0.9, 1.12), "shift": 0.05, "rotation": 5.0, "gamma": 0.35, "contrast": 0.2, "brightness": 0.06,
        "aspect": 0.0, "blur": 0.0, "blur_sigma": (0.005, 0.015),
    }
    assert old.renditions == 6 and (old_train.epochs, old_train.patience, old_train.swa_start) == (40, 10, 0)
    assert old_train.threshold_rule == "fixed" and old_train.threshold == 0.5
    new, new_train = recipe("robust2")
    assert new.row_settings() == old.row_settings()  # the same features at prediction: only training differs
    assert (new.augment.aspect, new.augment.blur, new.augment.zoom, new.renditions) == (0.2, 0.3, (0.85, 1.2), 12)
    assert (new_train.epochs, new_train.swa_start, new_train.threshold_rule) == (30, 11, "stress_youden")
    assert not old.trim_padding and not new.trim_padding
    trimmed, trimmed_train = recipe("robust3")
    assert trimmed == new.model_copy(update={"trim_padding": True}) and trimmed_train == new_train
    assert recipe("seed")[1].threshold_rule == "fixed"


def test_robust4_is_the_default_robust3_with_48_renditions_and_16_mild_views():
    """Issue 24: the earlier recipes score in one pass and keep their renditions; robust4 changes only these."""
    assert DEFAULT_RECIPE == "robust4" and RECIPES["robust4"] == {}
    robust3, robust3_train = recipe("robust3")
    robust4, robust4_train = recipe("robust4")
    assert robust4 == robust3.model_copy(update={"renditions": 48, "views": robust4.views}) and robust4_train == robust3_train
    assert robust4.views.model_dump() == {"count": 16, "zoom": (0.92, 1.09), "shift": 0.04, "rotation": 4.0, "aspect": 0.1, "seed": 0}
    assert all(recipe(name).transform.views.count == 0 for name in ("seed", "robust", "robust2", "robust3"))
    assert robust4.row_settings() != robust3.row_settings()  # what prediction computes differs: the views
    with pytest.raises(ValueError, match="views"):
        recipe_config("seed", transform={"views": {"count": 4}})


def test_seed_features_of_real_images_are_unchanged(shared_data):
    """The seed recipe's features, recorded with the code before recipes existed (tests/code/fixtures)."""
    recorded = json.loads(FIXTURE.read_text())
    assert recorded["images"]
    for entry in recorded["images"]:
        for key, config in recorded["configs"].items():
            features = featurize(shared_data / entry["relpath"], seed_transform(**config))
            assert features.tobytes().hex() == entry[key], (entry["relpath"], key)


def test_methods_that_only_max_pool_refuse_other_features():
    for update in ({"pooling": ("max", "mean")}, {"normalize": "zscore"}, {"renditions": 2}, {"trim_padding": True}):
        with pytest.raises(ValueError, match="resample"):
            TransformConfig(**{"method": "fast", "trim_padding": False, "renditions": 0, "pooling": ("max",),
                               "normalize": "none", **update})
    with pytest.raises(ValueError, match="pooling"):
        TransformConfig(method="resample", pooling=("max", "max"))
    assert TransformConfig(method="resample", grid=(7, 10), pooling=("max", "mean")).n_features == 140


def test_resample_features_are_finite_and_normalized_per_part(shared_data):
    path = next((shared_data / "train" / "NORMAL").glob("*.jpeg"))
    transform = recipe("robust").transform.model_copy(update={"size": (224, 224)})
    features = featurize(path, transform)
    assert features.shape == (140,) and features.dtype == np.float32
    for part in (features[:70], features[70:]):
        assert abs(part.mean()) < 1e-4 and abs(part.std() - 1) < 1e-3


def test_explicit_options_override_the_recipe_and_nothing_else():
    robust = recipe("robust")
    chosen = RunConfig(run={"recipe": "robust"}, train=TrainConfig(epochs=3))
    assert chosen.train.epochs == 3
    assert chosen.train.model_dump(exclude={"epochs"}) == robust.train.model_dump(exclude={"epochs"})
    assert chosen.transform == robust.transform
    # The seed recipe given complete configs is exactly those configs.
    chosen = recipe_config("seed", transform={"method": "exact"}, train={"seed": 4})
    assert chosen.transform == seed_transform(method="exact") and chosen.train == seed_train(seed=4)
    chosen = recipe_config("robust", transform=TransformConfig(renditions=0, method="resample"))
    assert chosen.transform.renditions == 0 and chosen.transform.pooling == ("max", "mean")
    # A resolved config given again is itself: the recipe is applied once, under what is given.
    assert RunConfig(**dict(chosen)) == chosen and RunConfig.model_validate(chosen.model_dump()) == chosen


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_as_on_main_before_recipes_became_partial(name):
    frozen = json.loads(RESOLVED.read_text())[name]
    resolved = recipe_config(name).model_dump(mode="json")
    # A transform field newer than the frozen recipe (views) has the value a card of that time is read with.
    assert recipe_config(name).transform == TransformConfig.stored(frozen["transform"])
    resolved["transform"] = {key: value for key, value in resolved["transform"].items() if key in frozen["transform"]}
    assert resolved == frozen
    assert RECIPES[DEFAULT_RECIPE] == {} and RunConfig() == recipe_config(DEFAULT_RECIPE)  # the default is robust4, frozen above


@pytest.mark.slow  # trains twice: in `make test`, not `make test-fast`
def test_weight_decay_shrinks_the_weights_and_zero_keeps_plain_adam():
    from pneumo.train import train

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 140)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.float32)
    base = seed_train(epochs=30, patience=30, lr=1e-2, loss="bce", balance="none", batch_size=50)
    plain = train(X, y, X[:50], y[:50], base)
    again = train(X, y, X[:50], y[:50], base.model_copy(update={"weight_decay": 0.0}))
    decayed = train(X, y, X[:50], y[:50], base.model_copy(update={"weight_decay": 1.0}))
    assert all((plain.state_dict[k] == again.state_dict[k]).all() for k in plain.state_dict)
    norm = lambda r: float(r.state_dict["hidden1.weight"].norm())  # noqa: E731
    assert norm(decayed) < 0.9 * norm(plain)
