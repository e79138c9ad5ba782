"""The batch scoring flow through a real Prefect server, on real X-rays."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from flows.predict import predict_batch
from pneumo.config import BatchOptions
from tests.helpers import task_states
from tests.predict_helpers import expected_probability, register_two


@pytest.fixture
def labelled_input(shared_data, tmp_path):
    """15 NORMAL and 15 PNEUMONIA films in class folders, plus one file that is no image."""
    root = tmp_path / "hospital"
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "films" / name).mkdir(parents=True)
        for path in sorted((shared_data / "train" / name).iterdir())[:15]:
            shutil.copy2(path, root / "films" / name / path.name)
    (root / "films" / "NORMAL" / "notes.txt").write_text("not a film")
    return root


def run(input: str, **kwargs):
    state = predict_batch(input, BatchOptions(chunk_size=10, workers=2, **kwargs), return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    return state.result(), task_states(run_id), run_id


def read_csv(uri: str) -> list[dict]:
    with open(uri, newline="") as handle:
        return list(csv.DictReader(handle))


def artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key for artifact in found}


def summary_state_message(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.message


def test_batch_flow_scores_quarantines_reports_and_caches(labelled_input, tmp_path):
    registry_root = str(tmp_path / "registry")
    weights = register_two(registry_root)
    workdir = tmp_path / "work"
    summary, states, run_id = run(input=str(labelled_input), registry=registry_root, workdir=str(workdir), runner="processes")

    assert summary["model"] == "tinynet v0001" and (summary["files"], summary["scored"], summary["quarantined"]) == (31, 30, 1)
    uri = Path(summary["predictions"])
    assert uri.parent == workdir / "predictions" / "tinynet" / "v0001" and uri.suffix == ".csv"
    rows = read_csv(str(uri))
    assert len(rows) == 30 and set(rows[0]) == {"relpath", "probability", "label", "threshold", "warnings", "true_label",
                                                "distance"}  # no features: they are for the drift check only
    first = rows[0]
    assert first["distance"] == ""  # a version registered without reference.json (issue 24) has no distance
    expected = expected_probability(weights["v0001"], labelled_input / first["relpath"])
    assert float(first["probability"]) == pytest.approx(expected, abs=1e-6)
    assert first["true_label"] == "NORMAL" and first["threshold"] == "0.5"
    quarantine = json.loads(Path(summary["quarantine_report"]).read_text())
    assert [q["relpath"] for q in quarantine] == ["films/NORMAL/notes.txt"] and "not an image" in quarantine[0]["reason"]
    assert summary["metrics"]["n"] == 30 and summary["metrics"]["threshold"] == 0.5
    assert set(states["score-chunk"]) == {"Completed"} and len(states["score-chunk"]) == 4
    assert {"predict-counts", "predictions", "predictions-file", "predict-metrics", "predict-quarantine"} <= artifact_keys(run_id)

    assert summary_state_message(run_id) == (
        f"scored 30 of 31 files with tinynet v0001 (1 quarantined): NORMAL {summary['predicted']['NORMAL']}, "
        f"PNEUMONIA {summary['predicted']['PNEUMONIA']}; labelled AUC {summary['metrics']['roc_auc']:.3f}; "
        "drift check: tinynet v0001 has no reference (registered before drift checks): nothing to compare with"
    )

    again, again_states, _ = run(input=str(labelled_input), registry=registry_root, workdir=str(workdir), runner="processes")
    assert set(again_states["score-chunk"]) == {"Cached"} and set(again_states["write-predictions"]) == {"Cached"}
    assert again["predictions"] == summary["predictions"] and again["metrics"] == summary["metrics"]


def test_a_flat_folder_without_labels_is_scored_with_a_pinned_version(shared_data, tmp_path):
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((shared_data / "train" / "PNEUMONIA").iterdir())[:5]:
        shutil.copy2(path, flat / path.name)
    summary, _, _ = run(input=str(flat), registry=registry_root, workdir=str(tmp_path / "work"), version="v0002",
                          runner="threads")
    assert summary["model"] == "tinynet v0002" and summary["scored"] == 5 and summary["metrics"] is None
    rows = read_csv(summary["predictions"])
    assert {row["true_label"] for row in rows} == {""} and {row["threshold"] for row in rows} == {"0.3"}
    assert "/v0002/" in summary["predictions"]


def test_an_s3_prefix_scored_with_an_s3_registry(shared_data, tmp_path, s3_bucket):
    from pneumo import storage

    registry_root = f"s3://{s3_bucket}/registry"
    weights = register_two(registry_root)
    films = sorted((shared_data / "train" / "NORMAL").iterdir())[:3] + sorted((shared_data / "train" / "PNEUMONIA").iterdir())[:3]
    for path in films:
        storage.upload_file(path, f"s3://{s3_bucket}/incoming/{path.parent.name}/{path.name}")
    summary, _, _ = run(input=f"s3://{s3_bucket}/incoming", registry=registry_root, workdir=str(tmp_path / "work"),
                        runner="threads")
    assert summary["scored"] == 6 and summary["metrics"]["n"] == 6
    rows = {row["relpath"]: row for row in read_csv(summary["predictions"])}
    assert float(rows[f"NORMAL/{films[0].name}"]["probability"]) == pytest.approx(
        expected_probability(weights["v0001"], films[0]), abs=1e-6
    )
