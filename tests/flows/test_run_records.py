"""The full flow's run record (runs/{flow run id}.json), which `pneumo gc` reads: a failed run says so."""

from __future__ import annotations

import json

from tests.helpers import full_flow as full  # flat settings; the run's own go into its run section
from pneumo import cleanup


def test_a_failed_run_leaves_a_failed_record_that_blocks_nothing(tmp_path):
    source = tmp_path / "empty" / "train" / "NORMAL"
    source.mkdir(parents=True)
    (source / "notes.txt").write_text("no image here")
    workdir = tmp_path / "work"
    state = full(source=str(tmp_path / "empty"), workdir=str(workdir), return_state=True)
    assert state.is_failed()
    records = [json.loads(path.read_text()) for path in (workdir / "runs").glob("*.json")]
    assert [(r["run_id"], r["state"]) for r in records] == [(str(state.state_details.flow_run_id), "failed")]
    assert records[0]["finished_at"] >= records[0]["started_at"]
    assert not cleanup.plan(str(workdir)).running  # gc does not wait for a failed run
