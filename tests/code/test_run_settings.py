"""`pneumo run` settings: read from pneumo.config.RunConfig, one default each, and checked before any service starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from cli import run as run_command
from pneumo.config import RunConfig
from pneumo.recipes import DEFAULT_RECIPE
from pneumo.config import recipe
from tests.helpers import invoke, pneumo_command

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> RunConfig:
    """The config `pneumo run ARGV` would run with, parsed by the real command (its --print-config)."""
    out = invoke("run", *argv, "--print-config")
    if out.exit_code:
        raise run_command.UsageError(out.output.strip())
    return RunConfig.model_validate(json.loads(out.output))


def help_text(*command: str) -> str:
    out = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def leaf_fields(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf field of ``model``, by its path: ("train", "epochs"), ("transform", "augment", "zoom")."""
    leaves = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            leaves += leaf_fields(field.annotation, (*path, name))
        else:
            leaves.append((*path, name))
    return leaves


def test_every_leaf_field_is_an_option_and_a_flow_parameter():
    """A field added to RunConfig reaches the CLI and the flow's parameter schema with no other edit (the card:
    tests/flows/test_full_flow.py)."""
    from prefect.utilities.callables import parameter_schema

    from flows.full import full

    text = " ".join(help_text(*pneumo_command("run")).split())
    schema = parameter_schema(full).model_dump()
    definitions = schema["definitions"]

    def in_schema(path: tuple[str, ...]) -> bool:
        node = schema["properties"][path[0]]
        for name in path[1:]:
            node = definitions[node.get("$ref", node.get("allOf", [{}])[0].get("$ref", "")).rsplit("/", 1)[-1]]
            node = node["properties"][name]
        return True

    for path in leaf_fields(RunConfig):
        assert "--" + ".".join(path).replace("_", "-") in text, path
        assert in_schema(path), path
    assert set(schema["properties"]) == set(RunConfig.model_fields)


@pytest.mark.slow  # CLI subprocesses
def test_every_field_has_its_description_and_default_in_help():
    text = " ".join(help_text(*pneumo_command("run")).split())
    flow_file = " ".join(help_text(sys.executable, "flows/full.py").split())
    assert text == flow_file  # one command, two names
    for path in leaf_fields(RunConfig):
        field = RunConfig.model_fields[path[0]]
        for name in path[1:]:
            field = field.annotation.model_fields[name]
        assert field.description and " ".join(field.description.split())[:20] in text, path
    default = recipe(DEFAULT_RECIPE).train
    assert f"Maximum number of epochs [default: {default.epochs}]" in text
    assert "--train.epochs --epochs" in text and "--run.recipe --recipe" in text and "--train.seed --seed" in text
    assert "--run.retrain --retrain" in text and "--source STR" in text and "--workdir STR" in text
    assert "AdamW" in text and "(default: WORKDIR/registry)" in text


@pytest.mark.slow  # CLI subprocesses
def test_a_misspelt_option_gets_a_suggestion_and_no_prefix_is_taken():
    for typed, suggested in (("--sorce", "--source"), ("--epoch", "--epochs")):
        for command in (pneumo_command("run"), [sys.executable, "flows/full.py"]):
            out = subprocess.run([*command, typed, "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and out.stdout == "", out
            assert len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert f"Unknown option: {typed}. Did you mean {suggested}?" in out.stderr, out.stderr
    assert parse(["--epochs", "5"]).train.epochs == 5


def test_flags_turn_the_default_over():
    chosen = parse(["--run.retrain", "--transform.no-shift-suite", "--transform.pooling", "mean", "max",
                    "--transform.augment.zoom", "0.8", "1.2"])
    assert chosen.run.retrain and not chosen.transform.shift_suite
    assert chosen.transform.pooling == ("mean", "max") and chosen.transform.augment.zoom == (0.8, 1.2)
    untouched = parse([])
    assert not untouched.run.retrain and untouched.transform == recipe(DEFAULT_RECIPE).transform


def test_a_setting_the_recipes_differ_on_takes_both_flags():
    assert parse([]).transform.trim_padding is recipe(DEFAULT_RECIPE).transform.trim_padding is True
    assert parse(["--recipe", "robust2", "--transform.trim-padding"]).transform.trim_padding is True
    assert parse(["--recipe", "robust2"]).transform.trim_padding is False
    assert parse(["--transform.no-trim-padding"]).transform.trim_padding is False
    with pytest.raises(run_command.UsageError, match="trimmed padding"):  # the seed's fast method cannot
        parse(["--recipe", "seed", "--transform.trim-padding"])


@pytest.mark.slow  # CLI subprocesses
def test_predict_and_promote_help_read_cleanly():
    predict = help_text(*pneumo_command("predict"))
    assert "Alias to load (unless --version is given)." in predict and "[default: champion]" in predict
    promote = help_text(*pneumo_command("models", "promote"))
    assert "``" not in promote and "The champion alias moves" in promote


def test_recipe_then_config_file_then_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[run]\nshard_size = 50\n[train]\nepochs = 7\npatience = 3\n[transform.augment]\nrotation = 2.5\n')
    chosen = parse(["--config", str(config), "--epochs", "9"])
    robust = recipe(DEFAULT_RECIPE)
    assert chosen.train.epochs == 9 and chosen.train.patience == 3  # command line, then file
    assert chosen.train.lr == robust.train.lr and chosen.run.shard_size == 50  # recipe, file
    assert chosen.transform.augment.rotation == 2.5 and chosen.transform.augment.zoom == robust.transform.augment.zoom
    seed = parse(["--recipe", "seed", "--config", str(config)])
    assert seed.train.epochs == 7 and seed.train.lr == recipe("seed").train.lr


def test_the_aspect_jitter_weight_averaging_and_threshold_rule_are_options():
    chosen = parse(["--transform.augment.aspect", "0.15", "--transform.augment.blur", "0", "--train.swa-start", "5",
                    "--train.threshold-rule", "fixed"])
    assert chosen.transform.augment.aspect == 0.15 and chosen.transform.augment.blur == 0.0
    assert chosen.train.swa_start == 5 and chosen.train.threshold_rule == "fixed"
    assert chosen.transform.augment.zoom == recipe(DEFAULT_RECIPE).transform.augment.zoom  # the rest: the recipe's
    assert parse([]).run.champion_metric == "stress_roc_auc"


def test_yaml_config_and_unknown_keys(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  recipe: seed\ntrain:\n  epochs: 11\n")
    chosen = parse(["--config", str(config)])
    assert chosen.run.recipe == "seed" and chosen.train.epochs == 11
    config.write_text("train:\n  epoch: 11\n")
    with pytest.raises(run_command.UsageError, match=r"Unknown option.*epoch.*Did you mean --train.epochs"):
        parse(["--config", str(config)])


@pytest.mark.slow  # CLI subprocesses
def test_print_config_is_the_same_from_both_commands():
    outs = [
        subprocess.run([*cmd, "--print-config", "--epochs", "5", "--recipe", "seed"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
        for cmd in (pneumo_command("run"), [sys.executable, "flows/full.py"])
    ]
    assert [out.returncode for out in outs] == [0, 0], [out.stderr for out in outs]
    printed = json.loads(outs[0].stdout)
    assert json.loads(outs[1].stdout) == printed
    assert printed["train"] == {**recipe("seed").train.model_dump(mode="json"), "epochs": 5}
    assert printed["run"]["recipe"] == "seed" and printed["run"]["percentile"] == RunConfig().run.percentile


def _bad_values(shared_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [
        (["--source", "/nonexistent"], "--source", "does not exist"),
        (["--source", str(shared_data / "train")], "--source", f"--source {shared_data}"),
        (["--source", str(shared_data), "--run.percentile", "150"], "--run.percentile 150", "less than 100"),
        (["--source", str(shared_data), "--epochs", "0"], "--epochs 0", "greater than or equal to 1"),
        (["--source", str(shared_data), "--model-name", "../up"], "--model-name", "unsafe path"),
        (["--source", str(shared_data), "--workdir", str(blocker / "w")], "--workdir", "not writable"),
        (["--source", str(shared_data), "--transform.method", "fast", "--transform.renditions", "2"],
         "transform settings", "method='resample'"),
    ]


@pytest.mark.slow  # CLI subprocesses
def test_bad_values_are_refused_at_once_in_one_line_before_prefect_is_imported(shared_data, tmp_path):
    for args, option, says in _bad_values(shared_data, tmp_path):
        started = time.monotonic()
        if "--workdir" not in args:
            args = [*args, "--workdir", str(tmp_path / "work")]
        out = subprocess.run([*pneumo_command("run"), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("pneumo run: error: "), (args, out.stderr)
        assert option in lines[0] and says in lines[0], (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stdout == ""
        # Measured at ~1 s; generous for a loaded 2-core machine, far below a Prefect server's start.
        assert seconds < 8, (args, seconds)
        assert not (tmp_path / "work").exists(), "nothing may be written before the checks pass"
    code = ("import sys\nfrom cli import main\ntry:\n    main(['run', '--epochs', '0'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out


def test_an_unreachable_bucket_is_refused_by_the_check(s3_bucket, shared_data):
    missing = "s3://no-such-bucket-pneumo/data"
    with pytest.raises(run_command.UsageError, match="--workdir s3://no-such-bucket-pneumo/data: .*check the bucket"):
        run_command.check(parse(["--source", str(shared_data), "--workdir", missing]))
    run_command.check(parse(["--source", str(shared_data), "--workdir", f"s3://{s3_bucket}/w"]))
    with pytest.raises(run_command.UsageError, match="--source s3://no-such-bucket-pneumo/data"):
        run_command.check(parse(["--source", missing]))
