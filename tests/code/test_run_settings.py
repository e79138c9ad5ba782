"""`pneumo run` settings: generated from the models, one default each, and checked before any service starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import settings
from pneumo.config import SplitConfig, TrainConfig, TransformConfig
from pneumo.recipes import DEFAULT_RECIPE, RECIPES
from tests.helpers import pneumo_command

REPO = Path(__file__).resolve().parents[2]


def test_the_flow_takes_its_defaults_from_run_settings():
    import inspect

    from flows.full import full

    parameters = inspect.signature(full.fn).parameters
    for name, field in settings.RunSettings.model_fields.items():
        assert parameters[name].default == field.default, name
    assert set(parameters) - set(settings.RunSettings.model_fields) == {"transform", "split", "train"}


def test_every_field_of_every_model_is_an_option_with_its_default():
    text = settings.build_parser("pneumo run").format_help()
    for model in (settings.RunSettings, TrainConfig, SplitConfig):
        for name in model.model_fields:
            assert f"--{name.replace('_', '-')}" in text, name
    for name in set(TransformConfig.model_fields) - {"size", "method", "augment"}:
        assert f"--{name.replace('_', '-')}" in text, name
    assert "--transform {fast,exact,resample}" in text and "--augment-rotation" in text
    epochs = settings.default_text(settings.BY_FLAG["--epochs"])
    assert epochs == (
        f"default: {RECIPES[DEFAULT_RECIPE].train.epochs} "
        f"(recipe seed: {RECIPES['seed'].train.epochs}, robust: {RECIPES['robust'].train.epochs})"
    )


def test_recipe_then_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 7\nshard-size = 50\n[train]\npatience = 3\n[transform.augment]\nrotation = 2.5\n')
    chosen = settings.parse(["--config", str(config), "--epochs", "9"], "pneumo run")
    robust = RECIPES[DEFAULT_RECIPE]
    assert chosen.train.epochs == 9 and chosen.train.patience == 3  # command line, then file
    assert chosen.train.lr == robust.train.lr and chosen.run.shard_size == 50  # recipe, file
    assert chosen.transform.augment.rotation == 2.5 and chosen.transform.augment.zoom == robust.transform.augment.zoom
    seed = settings.parse(["--recipe", "seed", "--config", str(config)], "pneumo run")
    assert seed.train.epochs == 7 and seed.train.lr == RECIPES["seed"].train.lr


def test_the_aspect_jitter_weight_averaging_and_threshold_rule_are_options():
    chosen = settings.parse(
        ["--augment-aspect", "0.15", "--augment-blur", "0", "--swa-start", "5", "--threshold-rule", "fixed"], "pneumo run"
    )
    assert chosen.transform.augment.aspect == 0.15 and chosen.transform.augment.blur == 0.0
    assert chosen.train.swa_start == 5 and chosen.train.threshold_rule == "fixed"
    assert chosen.transform.augment.zoom == RECIPES[DEFAULT_RECIPE].transform.augment.zoom  # the rest: the recipe's
    assert settings.parse([], "pneumo run").run.champion_metric == "stress_roc_auc"


def test_yaml_config_and_unknown_keys(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("recipe: seed\ntrain:\n  epochs: 11\n")
    chosen = settings.parse(["--config", str(config)], "pneumo run")
    assert chosen.run.recipe == "seed" and chosen.train.epochs == 11
    config.write_text("epoch: 11\n")
    with pytest.raises(settings.UsageError, match="unknown setting 'epoch'"):
        settings.parse(["--config", str(config)], "pneumo run")


def test_print_config_is_the_same_from_both_commands():
    outs = [
        subprocess.run([*cmd, "--print-config", "--epochs", "5", "--recipe", "seed"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
        for cmd in (pneumo_command("run"), [sys.executable, "flows/full.py"])
    ]
    assert [out.returncode for out in outs] == [0, 0], [out.stderr for out in outs]
    printed = json.loads(outs[0].stdout)
    assert json.loads(outs[1].stdout) == printed
    assert printed["train"] == {**RECIPES["seed"].train.model_dump(mode="json"), "epochs": 5}
    assert printed["recipe"] == "seed" and printed["percentile"] == settings.RUN_DEFAULTS.percentile


def _bad_values(shared_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [
        (["--source", "/nonexistent"], "--source", "does not exist"),
        (["--source", str(shared_data / "train")], "--source", f"--source {shared_data}"),
        (["--source", str(shared_data), "--percentile", "150"], "--percentile 150", "less than 100"),
        (["--source", str(shared_data), "--epochs", "0"], "--epochs 0", "greater than or equal to 1"),
        (["--source", str(shared_data), "--model-name", "../up"], "--model-name", "unsafe path"),
        (["--source", str(shared_data), "--workdir", str(blocker / "w")], "--workdir", "not writable"),
        (["--source", str(shared_data), "--transform", "fast", "--renditions", "2"], "transform settings", "method='resample'"),
    ]


def test_bad_values_are_refused_at_once_in_one_line(shared_data, tmp_path):
    for args, option, says in _bad_values(shared_data, tmp_path):
        started = time.monotonic()
        if "--workdir" not in args:
            args = [*args, "--workdir", str(tmp_path / "work")]
        out = subprocess.run([*pneumo_command("run"), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and option in lines[0] and says in lines[0], (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stdout == ""
        # Measured at ~1 s; generous for a loaded 2-core machine, far below the temporary server's ~15 s.
        assert seconds < 8, (args, seconds)
        assert not (tmp_path / "work").exists(), "nothing may be written before the checks pass"


def test_an_unreachable_bucket_is_refused_by_the_check(s3_bucket, shared_data):
    missing = "s3://no-such-bucket-pneumo/data"
    with pytest.raises(settings.UsageError, match="--workdir s3://no-such-bucket-pneumo/data: .*check the bucket"):
        settings.check(settings.parse(["--source", str(shared_data), "--workdir", missing], "pneumo run"))
    settings.check(settings.parse(["--source", str(shared_data), "--workdir", f"s3://{s3_bucket}/w"], "pneumo run"))
    with pytest.raises(settings.UsageError, match="--source s3://no-such-bucket-pneumo/data"):
        settings.check(settings.parse(["--source", missing], "pneumo run"))
