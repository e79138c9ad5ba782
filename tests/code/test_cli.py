"""The `pneumo` console script: predict and models, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pneumo import registry
from tests.helpers import run_pneumo
from tests.predict_helpers import card, expected_probability, register_two, state_dict, xray_pair

# each test starts the `pneumo` command (and torch) in a new process: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture
def two_versions(tmp_path):
    root = str(tmp_path / "registry")
    return root, register_two(root)


def test_predict_prints_a_table_and_json_lines(two_versions, shared_data):
    root, weights = two_versions
    normal, pneumonia = xray_pair(shared_data)
    table = run_pneumo("predict", str(normal), str(pneumonia), "--registry", root)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["image", "label", "probability", "distance", "warnings"] and len(lines) == 3
    assert "tinynet v0001 (threshold 0.5, onnxruntime): 2 scored, 0 failed" in table.stderr

    out = run_pneumo("predict", str(normal), str(pneumonia), "--registry", root, "--version", "v0002", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    for row, path in zip(rows, (normal, pneumonia)):
        assert row["probability"] == pytest.approx(expected_probability(weights["v0002"], path), abs=1e-6)
        assert row["model"] == {"name": "tinynet", "version": "v0002"} and row["threshold"] == 0.3


def test_a_non_image_fails_its_own_line_and_the_exit_code(two_versions, shared_data, tmp_path):
    root, _ = two_versions
    folder = tmp_path / "films"
    folder.mkdir()
    normal, pneumonia = xray_pair(shared_data)
    for path in (normal, pneumonia):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("hello")
    result = run_pneumo("predict", str(folder), "--registry", root, "--json")
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(r["probability"] is not None for r in rows) == 2
    failed = [line for line in result.stderr.splitlines() if line.startswith("pneumo: cannot score")]
    assert len(failed) == 1 and "notes.txt" in failed[0] and "not an image" in failed[0]


def test_missing_model_and_older_card_exit_2_with_one_line(two_versions, tmp_path, shared_data):
    root, _ = two_versions
    normal, _ = xray_pair(shared_data)
    for args, words in (
        (["--registry", str(tmp_path / "none")], "does not exist"),
        (["--registry", root, "--version", "v0042"], "no version 'v0042'"),
    ):
        result = run_pneumo("predict", str(normal), *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    weights = state_dict(5)
    old = card(weights)
    del old["schema_version"], old["threshold"]
    registry.register(root, "tinynet", weights, old)
    result = run_pneumo("predict", str(normal), "--registry", root, "--version", "v0003")
    assert result.returncode == 2 and "lacks schema_version, threshold" in result.stderr


def test_models_list_show_and_promote(two_versions):
    root, _ = two_versions
    listed = run_pneumo("models", "list", "--registry", root)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"v0001", "v0002"}
    assert rows["v0001"].endswith("champion") and rows["v0002"].endswith("latest") and "0.900" in rows["v0001"]

    shown = run_pneumo("models", "show", "v0002", "--registry", root)
    assert shown.returncode == 0 and "tinynet v0002" in shown.stdout and "threshold   0.3" in shown.stdout
    assert json.loads(run_pneumo("models", "show", "--registry", root, "--json").stdout)["version"] == "v0001"

    promoted = run_pneumo("models", "promote", "v0002", "--registry", root)
    assert promoted.returncode == 0 and "v0001 -> v0002" in promoted.stdout
    assert registry.get_alias(root, "tinynet", "champion") == "v0002"
    missing = run_pneumo("models", "promote", "v0009", "--registry", root)
    assert missing.returncode == 2 and "no version 'v0009'" in missing.stderr


def test_help_and_run_passthrough():
    top = run_pneumo("--help")
    names = ("run", "predict", "predict-batch", "serve", "models", "runs", "gc", "server")
    assert top.returncode == 0 and all(name in top.stdout for name in names)
    run_help = run_pneumo("run", "--help")  # flows/full.py's own options
    assert run_help.returncode == 0 and "--source" in run_help.stdout and "--run.retrain" in run_help.stdout


def test_predict_does_not_import_prefect():
    # The commands that read the registry only start without it: the whole CLI is imported, and predict's help shown.
    code = ("import sys, cli, pneumo.predict, pneumo.serve\n"
            "try:\n    cli.main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def test_the_console_script_is_the_cli_main():
    import tomllib
    from pathlib import Path

    import cli

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["pneumo"].partition(":")
    assert (module, function) == ("cli", "main") and callable(getattr(cli, function))
