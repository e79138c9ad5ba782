"""The batch flow checks every batch against the champion's reference, and Prefect hears about it."""

from __future__ import annotations

import time

from flows.predict import predict_batch
from pneumo.config import BatchOptions
from tests.flows.test_predict_flow import artifact_keys
from tests.predict_helpers import negative_films, register_with_reference


def events_named(name: str, resource_id: str, source: str, wait: float = 60.0) -> list:
    """The session server's events of that name and resource about ``source`` (the server stores them a moment after
    they arrive; other tests' registries also hold a tinynet v0001, so the source tells this test's events apart)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + wait
    while True:
        with get_client(sync_client=True) as client:
            found = [e for e in client.read_events(filter=wanted, limit=50).events if e.payload.get("source") == source]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_a_drifted_batch_is_flagged_in_the_summary_an_artifact_and_two_events(shared_data, tmp_path):
    registry_root = str(tmp_path / "registry")
    version = register_with_reference(registry_root, shared_data)
    films = negative_films(shared_data, tmp_path / "negatives", 110)
    state = predict_batch(str(films), BatchOptions(registry=registry_root, workdir=str(tmp_path / "work"), chunk_size=60,
                                                   runner="threads", workers=2), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    record = summary["drift"]
    assert record["verdict"] == "drift" and record["against"] == f"tinynet {version}" and record["n_films"] == 110
    assert "drift check: drift (against tinynet v0001)" in state.message
    assert "drift-check" in artifact_keys(state.state_details.flow_run_id)
    resource_id = f"pneumo.model.tinynet.{version}"
    [detected] = events_named("pneumo.drift.detected", resource_id, str(films))
    assert detected.resource["pneumo.drift.origin"] == "batch" and detected.payload["p_values"] == record["p_values"]
    assert events_named("pneumo.drift.checked", resource_id, str(films))
