"""`pneumo runs`: what the pneumo flows did (each run's final state message, its summary artifact), read from
PREFECT_API_URL or else the local server; `pneumo server`: that server's start, stop, status.
"""

from __future__ import annotations

from typing import Annotated, Any

import cyclopts
from cyclopts import Parameter

from cli import runtime
from cli.models import fail

FLOWS = ("pneumo-full", "pneumo-predict")  # every @flow of flows/


def _flows(client) -> dict[Any, str]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    found = client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))))
    return {flow.id: flow.name for flow in found}


def recent(limit: int = 10, scheduled: bool = False) -> list[tuple[str, Any]]:
    """Runs of the pneumo flows as (flow name, FlowRun): those that ran (they have a start), newest first;
    or with ``scheduled``, those still waiting for their time (a deployment's schedule), soonest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStartTime, FlowRunFilterStateType
    from prefect.client.schemas.sorting import FlowRunSort

    which = (FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))) if scheduled
             else FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)))
    with get_client(sync_client=True) as client:
        flows = _flows(client)
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))), flow_run_filter=which,
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC if scheduled else FlowRunSort.START_TIME_DESC,
                                     limit=limit)
    return [(flows.get(run.flow_id, "?"), run) for run in runs]


def find(which: str, api: str) -> tuple[str, Any, list[Any]]:
    """``last`` (the pneumo run that started last; a scheduled one has not) or a flow-run id: (flow name, FlowRun, its artifacts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    if which == "last":
        latest = recent(limit=1)
        if not latest:
            fail(f"no runs of {', '.join(FLOWS)} on {api} have started yet (`pneumo runs` lists scheduled ones)")
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
    """List the runs of pneumo-full and pneumo-predict that ran, with their state messages, then apart the scheduled ones; `pneumo runs show last` for one."""
    from pneumo.summary import runs_lines

    with runtime.prefect_api(start=False) as api:
        ran, scheduled = recent(max(limit, 1)), recent(max(limit, 1), scheduled=True)
        if not ran and not scheduled:
            fail(f"no runs of {', '.join(FLOWS)} on {api} yet", code=1)
        print("\n".join(runs_lines(ran, scheduled)))


@runs.command(name="show")
def runs_show(run: Annotated[str, Parameter(help="'last' (the run that started last), or a flow-run id from `pneumo runs`.")] = "last", /) -> None:
    """One run: state and message, duration, UI link, and its summary (version, metrics, files)."""
    from pneumo.summary import run_lines

    with runtime.prefect_api(start=False) as api:
        flow, found, artifacts = find(run, api)
        print("\n".join(run_lines(flow, found, artifacts, runtime.run_page(api, found.id))))


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

    try:
        found = local.stop()
    except RuntimeError as error:  # start.lock held by another process past the bound: said, never a hang
        fail(str(error), code=1)
    print("no local Prefect server was running" if found is None else f"stopped the local Prefect server (pid {found.pid}, {found.url})")


@server.command
def status() -> int:
    """Whether the local Prefect server runs, its UI, pid and files. Exit code 1 when it is not running."""
    from cli import server as local

    running, lines = local.status_lines()
    print("\n".join(lines))
    return 0 if running else 1
