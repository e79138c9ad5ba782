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


def test_runs_without_an_api_says_how_to_get_one():
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    out = subprocess.run(pneumo_command("runs"), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "PREFECT_API_URL is not set" in out.stderr and "make stack-up" in out.stderr
