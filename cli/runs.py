"""`pneumo runs`: what the pneumo flows did (each run's final state message, its summary artifact), read from
PREFECT_API_URL or else the local server; `pneumo server`: that server's start, stop, status.
"""

from __future__ import annotations

from typing import Annotated, Any

import cyclopts
from cyclopts import Parameter

from cli import runtime
from cli.models import fail
from pneumo.summary import run_list_lines, run_show_lines

FLOWS = ("pneumo-full", "pneumo-predict")  # every @flow of flows/
SUMMARY_KEYS = ("run-summary", "predict-counts")  # the artifact that sums up a run of each flow


def _flows(client) -> dict[Any, str]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    found = client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))))
    return {flow.id: flow.name for flow in found}


def recent(limit: int = 10) -> list[tuple[str, Any]]:
    """The latest runs of the pneumo flows, newest first, as (flow name, FlowRun)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flows = _flows(client)
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )
    return [(flows.get(run.flow_id, "?"), run) for run in runs]


def find(which: str, api: str) -> tuple[str, Any, list[Any]]:
    """``last`` (the newest run of any pneumo flow) or a flow-run id: (flow name, FlowRun, its artifacts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    if which == "last":
        latest = recent(limit=1)
        if not latest:
            fail(f"no runs of {', '.join(FLOWS)} on {api} yet")
        which = str(latest[0][1].id)
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(which)
        except Exception:  # no such run, or a malformed id the API's validation refuses
            fail(f"no flow run {which!r} on {api}; `pneumo runs` lists them")
        flow = client.read_flow(run.flow_id).name
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return flow, run, sorted(artifacts, key=lambda artifact: artifact.created)


# --------------------------------------------------------------------------- the commands


runs = cyclopts.App(name="runs", help="Recent runs of the pneumo flows, with what each did (from PREFECT_API_URL, or else the local server).")


@runs.default
def runs_list(*, limit: Annotated[int, Parameter(help="How many runs to list, newest first.")] = 10) -> None:
    """List recent runs of pneumo-full and pneumo-predict with their state messages; `pneumo runs show last` for one."""
    with runtime.prefect_api(start=False) as api:
        found = recent(max(limit, 1))
        if not found:
            fail(f"no runs of {', '.join(FLOWS)} on {api} yet", code=1)
        print("\n".join(run_list_lines(found)))


@runs.command(name="show")
def runs_show(run: Annotated[str, Parameter(help="'last' (the newest run), or a flow-run id from `pneumo runs`.")] = "last", /) -> None:
    """One run: state and message, duration, UI link, and its summary (version, metrics, files)."""
    with runtime.prefect_api(start=False) as api:
        flow, found, artifacts = find(run, api)
        print("\n".join(run_show_lines(flow, found, artifacts, runtime.run_page(api, found.id), SUMMARY_KEYS)))


server = cyclopts.App(name="server", help="The local Prefect server that `pneumo run` uses when PREFECT_API_URL is not set.")


@server.command
def start() -> None:
    """Start the local Prefect server in the background (runs start it themselves when needed)."""
    from cli import server as local

    try:
        found, started = local.ensure_running()
    except (RuntimeError, ValueError) as error:
        fail(str(error), code=1)
    print(f"local Prefect server {'started' if started else 'already running'}: UI {found.url} (pid {found.pid})")


@server.command
def stop() -> None:
    """Stop the local Prefect server now (a run using it fails: stop it between runs)."""
    from cli import server as local

    found = local.stop()
    print("no local Prefect server was running" if found is None else f"stopped the local Prefect server (pid {found.pid}, {found.url})")


@server.command
def status() -> int:
    """Whether the local Prefect server runs, its UI, pid and files. Exit code 1 when it is not running."""
    from cli import server as local

    running, lines = local.status_lines()
    print("\n".join(lines))
    return 0 if running else 1
