"""`pneumo run` settings: generated from the models, one default each, and checked before any service starts."""

from __future__ import annotations

import json
import os
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


def parse(argv: list[str]):
    """The settings `pneumo run ARGV` would run with (None after --print-config), parsed by the real command."""
    return settings.parse(argv)


def help_text(*command: str) -> str:
    out = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_flow_takes_its_defaults_from_run_settings():
    import inspect

    from flows.full import full

    parameters = inspect.signature(full.fn).parameters
    for name, field in settings.RunSettings.model_fields.items():
        assert parameters[name].default == field.default, name
    assert set(parameters) - set(settings.RunSettings.model_fields) == {"transform", "split", "train"}


def test_every_field_of_every_model_is_an_option_with_a_description_and_its_default():
    text = help_text(*pneumo_command("run"))
    flow_file = help_text(sys.executable, "flows/full.py").replace("python flows/full.py", "pneumo run")
    assert text.split() == flow_file.split()  # one command, two names
    rows: dict[str, str] = {}
    flag = None
    for line in text.splitlines():  # "│ --epochs   <int>   Maximum number of epochs ... [default: 40]   │", wrapped
        words = line.strip("│ ╭╰─").split()
        if words and words[0].startswith("--"):
            flag = words[0]
        elif not words or not line.startswith("│"):
            flag = None
        if flag:
            rows[flag] = " ".join([rows.get(flag, ""), *words])
    for option in settings.OPTIONS:
        row = rows[settings.flag_of(option)]
        assert option.description and option.description.rstrip(".")[1:20] in row, option.flag
        if settings.unwrap_optional(option.annotation) is not bool:  # a flag turns its default over: --retrain
            assert "[default: " in row, option.flag
    for model in (settings.RunSettings, TrainConfig, SplitConfig):
        for name in model.model_fields:
            assert any(flag.endswith(name.replace("_", "-")) for flag in rows), name
    for name in set(TransformConfig.model_fields) - {"size", "method", "augment"}:
        assert any(flag.endswith(name.replace("_", "-")) for flag in rows), name
    assert "--transform METHOD" in rows["--transform"] and "<hinge|bce>" in rows["--loss"]
    default, robust, seed = RECIPES[DEFAULT_RECIPE].train, RECIPES["robust"].train, RECIPES["seed"].train
    assert f"(recipe seed: {seed.epochs}, robust: {robust.epochs}) [default: {default.epochs}]" in rows["--epochs"]
    assert "AdamW" in rows["--lr"] and "[default: (WORKDIR/registry)]" in rows["--registry"]


def test_a_misspelt_option_gets_a_suggestion_and_no_prefix_is_taken():
    for typed, suggested in (("--sorce", "--source"), ("--epoch", "--epochs")):
        for command in (pneumo_command("run"), [sys.executable, "flows/full.py"]):
            out = subprocess.run([*command, typed, "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and out.stdout == "", out
            assert f"No such option: {typed}" in out.stderr and suggested in out.stderr, out.stderr
    assert parse(["--epochs", "5"]).train.epochs == 5


def test_flags_turn_the_default_over():
    chosen = parse(["--retrain", "--no-shift-suite", "--pooling", "mean", "--pooling", "max", "--augment-zoom", "0.8", "1.2"])
    assert chosen.run.retrain and not chosen.transform.shift_suite
    assert chosen.transform.pooling == ("mean", "max") and chosen.transform.augment.zoom == (0.8, 1.2)
    untouched = parse([])
    assert not untouched.run.retrain and untouched.transform == RECIPES[DEFAULT_RECIPE].transform


def test_a_setting_the_recipes_differ_on_takes_both_flags():
    assert parse([]).transform.trim_padding is RECIPES[DEFAULT_RECIPE].transform.trim_padding is True
    assert parse(["--recipe", "robust2", "--trim-padding"]).transform.trim_padding is True
    assert parse(["--recipe", "robust2"]).transform.trim_padding is False
    assert parse(["--no-trim-padding"]).transform.trim_padding is False
    with pytest.raises(settings.UsageError, match="contradict"):
        parse(["--trim-padding", "--no-trim-padding"])
    with pytest.raises(settings.UsageError, match="trimmed padding"):  # the seed's fast method cannot
        parse(["--recipe", "seed", "--trim-padding"])


def test_predict_and_promote_help_read_cleanly():
    predict = help_text(*pneumo_command("predict"))
    assert "Alias to load (unless --version is given)." in predict and "[default: champion]" in predict
    promote = help_text(*pneumo_command("models", "promote"))
    assert "``" not in promote and "The champion alias moves" in promote


def test_recipe_then_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 7\nshard-size = 50\n[train]\npatience = 3\n[transform.augment]\nrotation = 2.5\n')
    chosen = parse(["--config", str(config), "--epochs", "9"])
    robust = RECIPES[DEFAULT_RECIPE]
    assert chosen.train.epochs == 9 and chosen.train.patience == 3  # command line, then file
    assert chosen.train.lr == robust.train.lr and chosen.run.shard_size == 50  # recipe, file
    assert chosen.transform.augment.rotation == 2.5 and chosen.transform.augment.zoom == robust.transform.augment.zoom
    seed = parse(["--recipe", "seed", "--config", str(config)])
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
    chosen = parse(["--config", str(config)])
    assert chosen.run.recipe == "seed" and chosen.train.epochs == 11
    config.write_text("epoch: 11\n")
    with pytest.raises(settings.UsageError, match="unknown setting 'epoch'"):
        parse(["--config", str(config)])


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
        settings.check(parse(["--source", str(shared_data), "--workdir", missing]))
    settings.check(parse(["--source", str(shared_data), "--workdir", f"s3://{s3_bucket}/w"]))
    with pytest.raises(settings.UsageError, match="--source s3://no-such-bucket-pneumo/data"):
        settings.check(parse(["--source", missing]))
