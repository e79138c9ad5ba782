"""The whole pipeline with its workdir on a real S3 endpoint (moto's HTTP server, real boto3)."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

from tests.helpers import ROBUST3
from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo import registry, shard_files, storage
from pneumo.config import TrainConfig
from tests.helpers import task_states, use_s3_endpoint

# One xdist worker runs the whole module, so that its module fixture (s3_runs) is built once.
pytestmark = pytest.mark.xdist_group("test_s3_flow")

TASKS = ("download", "size-percentiles", "write-shard", "write-shard-index", "train-evaluate-register")
# Unique, so finding them anywhere can only mean a leak.
KEY_ID = "AKIAPNEUMO" + uuid.uuid4().hex[:10].upper()
SECRET = "pneumo-secret-" + uuid.uuid4().hex


def run(source, workdir, **options):
    state = full(
        source=str(source), workdir=workdir, shard_size=40, train={"epochs": 2, "patience": 2},
        runner="processes", workers=2, return_state=True, **{**ROBUST3, **options},
    )
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id


@pytest.fixture(scope="module")
def s3_runs(s3_endpoint, small_source):
    """First run, identical second run, then a forced retrain; all on one fresh bucket."""
    with pytest.MonkeyPatch.context() as env:
        bucket = use_s3_endpoint(env, s3_endpoint, KEY_ID, SECRET)
        workdir = f"s3://{bucket}/work"
        try:
            runs = [run(small_source, workdir), run(small_source, workdir), run(small_source, workdir, retrain=True)]
            yield workdir, runs
        finally:
            storage._s3_client.cache_clear()


def test_first_run_puts_shards_stats_results_and_model_on_s3(s3_runs):
    workdir, [(summary, run_id), *_] = s3_runs
    states = task_states(run_id, expected=TASKS)
    assert {name: set(states[name]) for name in TASKS} == {name: {"Completed"} for name in TASKS}
    uris = storage.list_uris(workdir)
    under = lambda folder: [u for u in uris if u.startswith(f"{workdir}/{folder}/")]  # noqa: E731
    assert len(under("manifests")) == 1 and under("manifests")[0] == summary["manifest"]
    assert under("stats") == [summary["size_stats"]]
    assert len(under("prefect-results")) >= len(TASKS)  # Prefect's persisted task results
    # Every shard of the index is on S3 with the bytes the index records.
    index = shard_files.read_index(summary["shards_index"])
    folder = summary["shards_index"].rsplit("/", 1)[0]
    assert sorted(u for u in under("shards") if u.endswith(".h5")) == sorted(f"{folder}/{s['name']}" for s in index["shards"])
    for entry in index["shards"]:
        assert hashlib.sha256(storage.read_bytes(f"{folder}/{entry['name']}")).hexdigest() == entry["sha256"]
    # The model, its card and both aliases.
    model_root = f"{workdir}/registry/tinynet"
    assert {f"{model_root}/v0001/model.pt", f"{model_root}/v0001/card.json",
            f"{model_root}/aliases/latest.json", f"{model_root}/aliases/champion.json"} <= set(uris)
    assert summary["card"] == f"{model_root}/v0001/card.json"
    card = storage.read_json(summary["card"])
    assert card["version"] == "v0001" and card["n_parameters"] == 2541
    assert card["data"]["shards_digest"] == hashlib.sha256(storage.read_bytes(summary["shards_index"])).hexdigest()
    assert card["champion_comparison"]["promoted"] is True and card["champion_comparison"]["champion_version"] is None
    assert summary["champion"] == "tinynet v0001"
    registry.load_model(f"{workdir}/registry", "tinynet", "champion")  # loads back from S3, weights_only


def test_an_identical_second_run_is_served_from_the_cache(s3_runs):
    workdir, [(first, _), (second, run_id), _] = s3_runs
    states = task_states(run_id, expected=TASKS)
    assert {name: set(states[name]) for name in TASKS} == {name: {"Cached"} for name in TASKS}
    assert second["model"] == first["model"] == "tinynet v0001"


def test_a_forced_retrain_registers_a_version_that_must_beat_the_champion(s3_runs):
    workdir, [(first, _), _, (third, run_id)] = s3_runs
    states = task_states(run_id, expected=TASKS)
    assert {name: set(states[name]) for name in TASKS[:-1]} == {name: {"Cached"} for name in TASKS[:-1]}
    assert states["train-evaluate-register"] == ["Completed"]
    reg = f"{workdir}/registry"
    assert registry.list_versions(reg, "tinynet") == ["v0001", "v0002"]
    # Same data, same seed: the same model, so a tie, and a tie keeps the champion.
    comparison = registry.load_card(reg, "tinynet", "v0002").champion_comparison
    assert comparison.champion_version == "v0001" and comparison.basis.startswith("re-scored")
    # Decided on the stress val (the default champion metric), the champion re-scored on it.
    assert comparison.metric == "stress_roc_auc"
    assert comparison.challenger_value == comparison.champion_value == first["metrics"]["stress_val"]["roc_auc"]
    assert comparison.promoted is False
    assert registry.get_alias(reg, "tinynet", "champion") == "v0001"
    assert registry.get_alias(reg, "tinynet", "latest") == "v0002"
    assert third["champion"] == "tinynet v0001"


def _all(read, **filters):
    """Every row of a paginated client read (the API returns at most 200 per call)."""
    rows, offset = [], 0
    while page := read(**filters, offset=offset, limit=200):
        rows += page
        offset += len(page)
    return rows


def test_no_credential_reaches_s3_cards_artifacts_logs_or_blocks(s3_runs):
    workdir, runs = s3_runs
    leaks = (KEY_ID.encode(), SECRET.encode())
    for uri in storage.list_uris(workdir.rsplit("/", 1)[0]):
        data = storage.read_bytes(uri)
        assert not any(leak in data for leak in leaks), uri
    run_ids = [run_id for _, run_id in runs]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=run_ids))
        )
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids + [c.id for c in children]))
        # Logs are shipped in batches; wait until the last run's last line has arrived.
        deadline = time.monotonic() + 60
        while True:
            text = "\n".join(log.message for log in _all(client.read_logs, log_filter=log_filter))
            if "registered tinynet v0002" in text or time.monotonic() > deadline:
                break
            time.sleep(1)
        artifacts = _all(client.read_artifacts)
        blocks = _all(client.read_block_documents, include_secrets=True)
    assert "registered tinynet v0002" in text  # the logs did arrive, so their check means something
    assert {"champion-challenger", "model-card"} <= {a.key for a in artifacts}
    results_blocks = [b for b in blocks if b.name.startswith("pneumo-results-")]
    assert any(b.data["root"] == f"{workdir}/prefect-results" for b in results_blocks)
    for blob in [text, *(str(a.data) + str(a.description) for a in artifacts), *(str(b.data) for b in blocks)]:
        assert KEY_ID not in blob and SECRET not in blob
