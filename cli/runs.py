"""`pneumo runs`: what the pneumo flows did (each run's final state message, its summary artifact), read from
PREFECT_API_URL or else the local server; `pneumo server`: that server's start, stop, status.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Optional

import cyclopts
from cyclopts import Parameter

from cli import runtime
from cli.models import fail

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


def _when(moment: Optional[datetime]) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _state(run: Any) -> str:
    return run.state.name if run.state else "-"


def list_lines(runs: list[tuple[str, Any]]) -> list[str]:
    """A table: start, flow, state, run name and id, then the state message (what the run did)."""
    lines = [f"{'started':<19}  {'flow':<14}  {'state':<9}  {'id':<36}  message"]
    for flow, run in runs:
        message = " ".join((run.state.message or "").split()) if run.state else ""
        lines.append(f"{_when(run.start_time or run.expected_start_time):<19}  {flow:<14}  {_state(run):<9}  {str(run.id):<36}  {message}")
    return lines


def show_lines(flow: str, run: Any, artifacts: list[Any], api: str) -> list[str]:
    """One run: its state and message, duration, link, and the summary artifact (version, metrics, files)."""
    seconds = run.total_run_time.total_seconds() if run.total_run_time else None
    lines = [
        f"{flow} run {run.name} ({run.id})",
        f"  state      {_state(run)}" + (f" after {seconds:.0f} s" if seconds is not None else ""),
        f"  started    {_when(run.start_time)}",
        f"  message    {' '.join((run.state.message or '-').split()) if run.state else '-'}",
    ]
    lines.append(f"  UI         {runtime.run_page(api, run.id)}")
    by_key = {artifact.key: artifact for artifact in artifacts if artifact.key}  # the latest of each key
    summary = next((by_key[key] for key in SUMMARY_KEYS if key in by_key), None)
    if summary is not None:
        lines += ["", f"{summary.key}:", _as_text(summary.data)]
    others = [key for key in by_key if summary is None or key != summary.key]
    if others:
        lines += ["", "artifacts: " + ", ".join(others)]
    return lines


def _as_text(data: Any) -> str:
    """An artifact's data as terminal text: markdown as it is, a table's rows one per line."""
    if isinstance(data, str) and data.lstrip().startswith("["):
        import json

        try:
            data = json.loads(data)
        except ValueError:
            return data
    if isinstance(data, list):
        return "\n".join("  " + ", ".join(f"{key} {value}" for key, value in row.items()) for row in data)
    return str(data).rstrip()


# --------------------------------------------------------------------------- the commands


runs = cyclopts.App(name="runs", help="Recent runs of the pneumo flows, with what each did (from PREFECT_API_URL, or else the local server).")


@runs.default
def runs_list(*, limit: Annotated[int, Parameter(help="How many runs to list, newest first.")] = 10) -> None:
    """List recent runs of pneumo-full and pneumo-predict with their state messages; `pneumo runs show last` for one."""
    with runtime.prefect_api(start=False) as api:
        found = recent(max(limit, 1))
        if not found:
            fail(f"no runs of {', '.join(FLOWS)} on {api} yet", code=1)
        print("\n".join(list_lines(found)))


@runs.command(name="show")
def runs_show(run: Annotated[str, Parameter(help="'last' (the newest run), or a flow-run id from `pneumo runs`.")] = "last", /) -> None:
    """One run: state and message, duration, UI link, and its summary (version, metrics, files)."""
    with runtime.prefect_api(start=False) as api:
        print("\n".join(show_lines(*find(run, api), api)))


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
