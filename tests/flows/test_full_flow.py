"""The whole pipeline through a real Prefect server, on whole patients of the real data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from flows.full import full
from pneumo import features, shard_files
from pneumo.config import RunConfig
from pneumo.manifest import load_manifest
from pneumo.model import TinyNet
from pneumo.recipes import DEFAULT_RECIPE
from pneumo.config import recipe
from tests.helpers import task_states

# One xdist worker runs the whole module, so that its module fixture (first_run) is built once.
pytestmark = pytest.mark.xdist_group("test_full_flow")

TASKS = ("download", "size-percentiles", "write-shard", "write-shard-index", "train-evaluate-register")
QUICK = {"epochs": 2, "patience": 2}  # no assertion here depends on how well the model learns
SHARD_SIZE = 40  # several shards per split of the 160-film source


def run(source: Path, workdir: Path, runner: str = "threads", **train):
    state = full(
        source=str(source), workdir=str(workdir), run={"shard_size": SHARD_SIZE, "runner": runner, "workers": 2},
        train={**QUICK, **train},  # the default recipe's, with fewer epochs
        return_state=True,
    )
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id, expected=TASKS)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_run(small_source, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    summary, states = run(small_source, workdir, runner="processes")
    return workdir, summary, states


def test_first_run_registers_v0001_with_a_complete_card(first_run, small_source):
    workdir, summary, states = first_run
    assert {name: set(s) for name, s in states.items() if name in TASKS} == {name: {"Completed"} for name in TASKS}
    card_path = workdir / "registry" / "tinynet" / "v0001" / "card.json"
    assert summary["card"] == str(card_path)
    card = json.loads(card_path.read_text())
    assert card["model_name"] == "tinynet" and card["version"] == "v0001"
    assert card["n_parameters"] == 2541
    for split in ("val", "test"):
        metrics = card["metrics"][split]
        assert set(metrics) >= {"accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "confusion_matrix", "n"}
        assert metrics["n"] > 0
    assert card["data"]["manifest_digest"] == summary["dataset_version"]
    assert card["data"]["shards_digest"] == sha256(summary["shards_index"])
    assert set(card["data"]["counts"]) == {"train", "val", "test"}
    assert card["code_version"] and card["created_at"] and card["config"]["train"]["epochs"] == QUICK["epochs"]
    alias = json.loads((workdir / "registry" / "tinynet" / "aliases" / "latest.json").read_text())
    assert alias["version"] == "v0001"
    # The report beside the card, and the run's record for `pneumo gc`: finished, with what it used.
    assert summary["report"] == str(card_path.parent / "report.html")
    assert "report.html" in card["files"] and "tinynet v0001" in (card_path.parent / "report.html").read_text()
    records = [json.loads(path.read_text()) for path in (workdir / "runs").glob("*.json")]
    assert ("finished", card["data"]["manifest_digest"], card["data"]["shards_digest"]) in [
        (record["state"], record.get("manifest_digest"), record.get("shards_digest")) for record in records
    ]
    assert "running" not in [record["state"] for record in records]
    # The card stores the run's config whole: every leaf field of RunConfig, with no edit here for a new one.
    from tests.code.test_run_settings import leaf_fields

    for path in leaf_fields(RunConfig):
        value = card["config"]
        for name in path:
            assert isinstance(value, dict) and name in value, path
            value = value[name]
    assert card["config"]["source"] == str(small_source) and card["recipe"] == card["config"]["run"]["recipe"]
    # The weights load safely and predict.
    state_dict = torch.load(card_path.parent / "model.pt", weights_only=True)
    model = TinyNet()
    model.load_state_dict(state_dict)


def test_first_run_card_has_cis_history_threshold_and_pictures_beside_it(first_run):
    workdir, _, _ = first_run
    folder = workdir / "registry" / "tinynet" / "v0001"
    card = json.loads((folder / "card.json").read_text())
    assert card["labels"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    # The default recipe chooses its threshold on the stress val; every reported metric uses it.
    assert card["config"]["train"]["threshold_rule"] == recipe(DEFAULT_RECIPE).train.threshold_rule == "stress_youden"
    assert 0 < card["threshold"] < 1
    for split in ("val", "test"):
        metrics = card["metrics"][split]
        assert metrics["threshold"] == card["threshold"]
        low, high = metrics["ci95"]["accuracy"]
        assert low <= metrics["accuracy"] <= high
    assert [h["epoch"] for h in card["training"]["history"]] == list(range(1, card["training"]["epochs_run"] + 1))
    assert len(card["plots"]) >= 6
    for name in card["plots"]:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_input_image_is_accounted_for(first_run, small_source):
    workdir, summary, _ = first_run
    inputs = sorted(p.relative_to(small_source).as_posix() for p in small_source.rglob("*") if p.is_file())
    manifest = load_manifest(summary["manifest"])
    index = shard_files.read_index(summary["shards_index"])
    in_shards = []
    for split in ("train", "val", "test"):
        in_shards += shard_files.load_split(summary["shards_index"], split).originals().relpaths
    quarantined = [q.relpath for q in manifest.quarantine] + [q["relpath"] for q in index["quarantine"]]
    assert sorted(in_shards + quarantined) == inputs
    assert len(set(in_shards)) == len(in_shards)
    # Carved sets never share a patient with train.
    train_patients = set(shard_files.load_split(summary["shards_index"], "train").patient_ids)
    for split in ("val", "test"):
        assert not train_patients & set(shard_files.load_split(summary["shards_index"], split).patient_ids)


def test_identical_rerun_is_fully_cached(first_run, small_source):
    workdir, summary, _ = first_run
    again, states = run(small_source, workdir)
    assert {name: set(s) for name, s in states.items() if name in TASKS} == {name: {"Cached"} for name in TASKS}
    assert again["card"] == summary["card"]


def test_changing_only_epochs_reruns_only_training(first_run, small_source):
    workdir, summary, _ = first_run
    again, states = run(small_source, workdir, epochs=QUICK["epochs"] + 1)
    upstream = [name for name in TASKS if name != "train-evaluate-register"]
    assert {name: set(states[name]) for name in upstream} == {name: {"Cached"} for name in upstream}
    assert states["train-evaluate-register"] == ["Completed"]
    assert again["card"] != summary["card"]
    assert json.loads(Path(again["card"]).read_text())["config"]["train"]["epochs"] == QUICK["epochs"] + 1


def test_a_deleted_shard_is_rebuilt_identically(first_run, small_source):
    workdir, summary, _ = first_run
    index = shard_files.read_index(summary["shards_index"])
    folder = Path(summary["shards_index"]).parent
    victim = folder / index["shards"][0]["name"]
    before = sha256(str(victim))
    victim.unlink()
    run(small_source, workdir)
    assert victim.exists()
    assert sha256(str(victim)) == before


def test_a_transient_error_is_retried_to_the_same_shards(small_source, tmp_path, monkeypatch, first_run):
    _, clean, _ = first_run
    real = features.read_verified
    failed = []

    def flaky(root, record):
        # The first image of the first train shard fails once, as a flaky disk would.
        if not failed and record.relpath.startswith("train/"):
            failed.append(record.relpath)
            raise OSError("injected transient read error")
        return real(root, record)

    monkeypatch.setattr(features, "read_verified", flaky)
    summary, states = run(small_source, tmp_path / "w", runner="threads")
    assert failed, "the fault was never injected"
    assert "Failed" not in states["write-shard"]
    assert sorted(states["write-shard"]).count("Completed") == len(states["write-shard"])
    clean_index = shard_files.read_index(clean["shards_index"])
    flaky_index = shard_files.read_index(summary["shards_index"])
    assert [s["sha256"] for s in flaky_index["shards"]] == [s["sha256"] for s in clean_index["shards"]]


def test_cli_help_lists_every_option():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "flows/full.py", "--help"], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    for option in ("--source", "--workdir", "--registry", "--epochs", "--seed", "--run.percentile", "--run.runner"):
        assert option in out


def _artifacts(flow_run_id) -> dict:
    """The latest artifact of each key created by the flow run or any of its tasks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in sorted(found, key=lambda a: a.created)}


def _pneumo_runs(*args: str):
    import os
    import subprocess

    from prefect.settings import PREFECT_API_URL

    from tests.helpers import pneumo_command

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(pneumo_command("runs", *args), env=env, capture_output=True, text=True, timeout=300)


def test_the_final_state_and_run_summary_say_what_was_registered(first_run, small_source):
    workdir, summary, _ = first_run
    where = {"source": str(small_source), "workdir": str(workdir)}
    run = {"shard_size": SHARD_SIZE, "runner": "threads", "workers": 2}
    cached = full(**where, run=run, train=QUICK, return_state=True)
    assert cached.message.startswith("nothing new registered (cache hit;") and "--retrain to train anyway" in cached.message
    assert cached.result()["registered"] is False and cached.result()["version"] == summary["version"]
    artifacts = _artifacts(cached.state_details.flow_run_id)
    assert artifacts["run-summary"].data.startswith("# nothing new registered (cache hit")
    assert artifacts["transform-progress"].data == 100.0  # cached shards: the stage still ends at 100 %
    shown = _pneumo_runs("show", str(cached.state_details.flow_run_id))  # where the user looks
    assert shown.returncode == 0, shown.stderr
    assert "message    nothing new registered (cache hit;" in shown.stdout and "run-summary:" in shown.stdout
    assert "| val |" in shown.stdout and f"- card: `{summary['card']}`" in shown.stdout

    trained = full(**where, run={**run, "retrain": True}, train=QUICK, return_state=True)
    result = trained.result()
    assert result["registered"] is True and result["version"] != summary["version"]
    assert trained.message.startswith(f"registered tinynet {result['version']}; champion ")
    assert f"val AUC {result['metrics']['val']['roc_auc']:.3f}" in trained.message
    artifacts = _artifacts(trained.state_details.flow_run_id)
    assert f"registered tinynet {result['version']}" in artifacts["run-summary"].data
    assert "| val |" in artifacts["run-summary"].data and "| test |" in artifacts["run-summary"].data
    assert artifacts["training-progress"].data == 100.0
    # Evaluation is a step of its own, after the training bar ended at the epochs run.
    assert artifacts["evaluation-progress"].data == 100.0 and "evaluation: 3/3 steps" in artifacts["evaluation-progress"].description
    assert "epochs" in artifacts["training-progress"].description and "val AUC" in artifacts["training-progress"].description
