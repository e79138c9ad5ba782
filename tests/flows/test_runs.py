"""`pneumo runs` and `pneumo runs show`: what the runs did, read back from a real Prefect server."""

from __future__ import annotations

import os
import subprocess

from prefect.settings import PREFECT_API_URL

from tests.helpers import pneumo_command
from tests.flows.test_predict_flow import run as run_batch
from tests.flows.test_predict_flow import labelled_input  # noqa: F401  (a fixture)
from tests.predict_helpers import register_two


def pneumo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run(pneumo_command(*args), env=env, capture_output=True, text=True, timeout=300)


def test_runs_lists_the_batch_run_with_its_message_and_shows_its_summary(labelled_input, tmp_path):  # noqa: F811
    registry_root = str(tmp_path / "registry")
    register_two(registry_root)
    summary, _, run_id = run_batch(input=str(labelled_input), registry=registry_root, workdir=str(tmp_path / "work"),
                                   runner="threads")

    listed = pneumo("runs", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if str(run_id) in line)
    assert "pneumo-predict" in line and "Completed" in line
    assert f"scored 30 of 31 files with tinynet v0001 (1 quarantined): NORMAL {summary['predicted']['NORMAL']}" in line

    for which in ("last", str(run_id)):
        shown = pneumo("runs", "show", which)
        assert shown.returncode == 0, shown.stderr
        assert f"({run_id})" in shown.stdout and "state      Completed" in shown.stdout
        assert f"/runs/flow-run/{run_id}" in shown.stdout  # the UI link
        assert "predict-counts:" in shown.stdout and "model tinynet v0001, files 31, scored 30" in shown.stdout

    unknown = pneumo("runs", "show", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 2 and unknown.stderr.startswith("pneumo: no flow run '00000000-") and unknown.stdout == ""


def test_runs_without_an_api_says_how_to_get_one(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env["PNEUMO_SERVER_DIR"] = str(tmp_path / "no-server")  # an empty folder: no local server either
    out = subprocess.run(pneumo_command("runs"), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "PREFECT_API_URL is not set" in out.stderr and "pneumo server start" in out.stderr


def test_a_cli_run_prints_no_prefect_banner_and_ends_on_its_summary(shared_data, tmp_path):
    from tests.helpers import copy_patient_subset

    source = copy_patient_subset(shared_data, tmp_path / "subset", per_class=40)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # a temporary server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    out = subprocess.run(
        [*pneumo_command("run"), "--source", str(source), "--workdir", str(tmp_path / "work"), "--epochs", "3",
         "--train.patience", "3", "--run.runner", "threads", "--run.workers", "1", "--recipe", "robust3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "prefect.io/docs" not in out.stdout and "temporary server" not in out.stdout
    lines = out.stdout.rstrip().splitlines()
    assert lines[-1].startswith("  run page     "), lines[-12:]  # the summary's last line ends the output
    assert any(line.startswith("pneumo: registered tinynet v0001") for line in lines[-16:])
    assert sum("the val split has only" in line for line in lines) == 2  # logged, and in the summary


def test_runs_lists_runs_that_ran_and_scheduled_ones_apart(tmp_path):
    """Issue 23, also seen: after `make deploy`, `pneumo runs show last` showed a future scheduled run, and
    `pneumo runs` listed the scheduled runs first under a column headed "started"."""
    from datetime import datetime, timedelta, timezone

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    @flow(name="pneumo-predict")
    def ran() -> str:
        return "ran"

    state = ran(return_state=True)
    ran_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        future = client.create_flow_run(ran, name="tomorrows-run",
                                        state=Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=1)))
    try:
        listed = pneumo("runs", "--limit", "50")
        assert listed.returncode == 0, listed.stderr
        table, _, scheduled = listed.stdout.partition("\nscheduled for")
        assert ran_id in table and str(future.id) not in table  # "started": only runs that started
        assert str(future.id) in scheduled and "tomorrows-run" in scheduled and ran_id not in scheduled
        shown = pneumo("runs", "show", "last")
        assert shown.returncode == 0 and f"({ran_id})" in shown.stdout, shown.stdout + shown.stderr
    finally:
        with get_client(sync_client=True) as client:
            client.delete_flow_run(future.id)
