"""A poisoned Prefect results cache: every record of a finished run replaced by code, then the run again.

Three ways a record can carry code on Prefect 3.9, each planted in turn: a record whose
metadata names the pickle serializer, bare base64 pickle bytes (Prefect's fallback reads a
record that is not JSON with the store's serializer), and a record naming the JSON
serializer whose ``__class__`` is ``subprocess.run`` (Prefect's JSON decoder calls any
importable name). Each writes a marker file if it runs.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from tests.helpers import ROBUST3
from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo import storage
from pneumo.config import TrainConfig
from tests.helpers import task_states, use_s3_endpoint

TASKS = ("download", "size-percentiles", "write-shard", "write-shard-index", "train-evaluate-register")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def planted_record(kind: int, marker: Path) -> bytes:
    pickled = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    if kind == 0:  # a well-formed record that says "pickle"
        return json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": pickled}).encode()
    if kind == 1:  # not a record at all: read with the store's (pickle) serializer
        return pickled.encode()
    # JSON serializer, whose decoder imports and calls the named "class"
    call = {"__class__": "subprocess.run", "data": {"args": ["touch", str(marker)]}}
    return json.dumps({"metadata": {"serializer": {"type": "json"}}, "result": json.dumps(call)}).encode()


def plant_everywhere(results: str, markers: Path) -> list[str]:
    """Replace every record under ``results`` by an executing payload; return the record names."""
    uris = sorted(u for u in storage.list_uris(results) if not u.rsplit("/", 1)[-1].startswith("."))
    assert uris, f"no result records under {results}"
    names = []
    for kind, uri in enumerate(uris):
        name = uri.rsplit("/", 1)[-1]
        storage.write_bytes(uri, planted_record(kind % 3, markers / name))
        names.append(name)
    return names


def run(source, workdir: str, *, check: bool = True, **options):
    state = full(
        source=str(source), workdir=workdir, shard_size=150, train={"epochs": 3, "patience": 3},
        return_state=True, **{**ROBUST3, **options},
    )
    assert state.is_completed() or not check, state.message
    return state


def run_logs(run_id, until: str) -> str:
    """The flow run's log lines (task runs included), once ``until`` has arrived (logs ship in batches)."""
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            text = "\n".join(log.message for log in logs)
            if until in text or time.monotonic() > deadline:
                return text
            time.sleep(1)


def poisoned_rerun(source, workdir: str, tmp_path: Path, **options) -> list[str]:
    run(source, workdir, **options)
    markers = tmp_path / "markers"
    markers.mkdir()
    names = plant_everywhere(storage.join(workdir, "prefect-results"), markers)
    state = run(source, workdir, check=False, **options)
    ran = sorted(p.name for p in markers.iterdir())
    assert ran == [], f"{len(ran)} of {len(names)} planted records ran their code"
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    states = task_states(run_id, expected=TASKS)
    # Every task ran again (a refused record is no cache hit) and completed.
    assert {name: set(states[name]) for name in TASKS} == {name: {"Completed"} for name in TASKS}
    logs = run_logs(run_id, until=names[-1])
    warnings = [line for line in logs.splitlines() if "refused cached result" in line]
    refused = [name for name in names if any(name in line for line in warnings)]
    assert refused == names, f"not named in a warning: {sorted(set(names) - set(refused))}"
    return names


@pytest.fixture
def results_key(monkeypatch):
    monkeypatch.setenv("PNEUMO_RESULTS_KEY", uuid.uuid4().hex + uuid.uuid4().hex)


def test_planted_records_in_a_local_workdir_are_refused_and_recomputed(small_source, tmp_path, results_key):
    workdir = str(tmp_path / "work")
    poisoned_rerun(small_source, workdir, tmp_path, runner="threads")
    # The recomputed records are signed again: the next run is served from the cache.
    states = task_states(run(small_source, workdir, runner="threads").state_details.flow_run_id, expected=TASKS)
    assert {name: set(states[name]) for name in TASKS} == {name: {"Cached"} for name in TASKS}


def test_planted_records_in_an_s3_workdir_are_refused_and_recomputed(s3_endpoint, small_source, tmp_path, results_key):
    with pytest.MonkeyPatch.context() as env:
        bucket = use_s3_endpoint(env, s3_endpoint)
        try:
            poisoned_rerun(small_source, f"s3://{bucket}/work", tmp_path, runner="processes", workers=2)
        finally:
            storage._s3_client.cache_clear()
