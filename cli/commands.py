"""The commands that score and clean: predict, predict-batch, serve, gc.

Only ``predict-batch`` imports Prefect (inside it): the others start in about a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

from cyclopts import Parameter

from cli.models import AsJson, Where, fail
from pneumo.config import BATCH_INPUT, BatchOptions, ModelLocation

SHUTDOWN_SECONDS = 0.5  # pneumo serve: the most a request may delay the exit after SIGTERM


def _load_predictor(where: ModelLocation, alias: Optional[str], version: Optional[str], **kwargs):
    from pneumo import predict

    if alias and version:
        fail("give --alias or --version, not both")
    try:
        return predict.Predictor.from_registry(where.registry_uri(), where.model_name, alias=alias or "champion",
                                               version=version, **kwargs)
    except (predict.CardError, predict.ModelNotFound, ValueError) as error:
        fail(str(error))


def predict(
    inputs: Annotated[list[Path], Parameter(help="Images, or folders of images (read recursively).")],
    /, *,
    where: Where = ModelLocation(),
    alias: Annotated[Optional[str], Parameter(help="Alias to load (unless --version is given). [default: champion]",
                                              show_default=False)] = None,
    version: Annotated[Optional[str], Parameter(help="Version to load, e.g. v0003, instead of an alias.")] = None,
    as_json: Annotated[AsJson, Parameter(help="One JSON object per line instead of a table.")] = False,
    views: Annotated[Optional[int], Parameter(help="Test-time views per film instead of the card's; 0: one pass.")] = None,
) -> int:
    """Score X-rays in this process: label, PNEUMONIA probability, distance from the training films and warnings.

    Exit code 0 when every input was scored, 1 when some could not be (each with its reason), 2 on bad usage.
    """
    from pneumo.names import printable
    from pneumo.predict import list_inputs
    from pneumo.summary import prediction_table

    paths = [image.path for item in inputs if item.is_dir() for image in list_inputs(item)]
    paths += [str(item) for item in inputs if not item.is_dir()]  # a missing file is reported per input
    if not paths:
        fail("no files found in " + ", ".join(map(str, inputs)))
    results = (predictor := _load_predictor(where, alias, version, views=views)).predict(paths)
    failed = [p for p in results if not p.ok]
    print("\n".join(json.dumps(p.to_dict()) for p in results) if as_json else "\n".join(prediction_table(results)))
    for p in failed:
        print(f"pneumo: cannot score {printable(p.input)}: {printable(p.error)}", file=sys.stderr)
    print(f"{where.model_name} {predictor.version} (threshold {predictor.threshold:.4g}, {predictor.runtime}): "
          f"{len(results) - len(failed)} scored, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def predict_batch(*, input: Annotated[str, Parameter(help=BATCH_INPUT)],
                  batch: Annotated[BatchOptions, Parameter(name="*")] = BatchOptions(), verbose: Annotated[bool, Parameter(
        name=["--verbose", "-v"], negative=(), help="Show tracebacks on the terminal too")] = False) -> int:
    """Score every image of a folder, .zip or s3:// prefix with a registered model: the batch flow, through Prefect."""
    from cli import runtime
    from pneumo.signatures import key_problem

    if problem := key_problem():  # said now, before Prefect loads (as `pneumo run` does)
        fail(problem)
    runtime.stop_on_interrupt()
    if batch.runner == "processes":
        from pneumo import pool

        pool.warm_up()
    from flows.predict import predict_batch as flow
    from pneumo.summary import batch_text

    return runtime.run_flow(flow, {"input": input, "batch": batch}, lambda summary, seconds: print(batch_text(summary, seconds)),
                            verbose=verbose)


def drift(source: Annotated[str, Parameter(help=BATCH_INPUT)], /, *, where: Where = ModelLocation(),
          version: Annotated[Optional[str], Parameter(help="Version to compare with, e.g. v0003. [default: champion]")] = None,
          as_json: Annotated[AsJson, Parameter(help="The verdict and the figures as one JSON object.")] = False) -> int:
    """Are these films like the ones the version learned from? `verdict: none|warn|drift` (or `too few films`)
    first, then the figures; a Prefect event (pneumo.drift.checked, and pneumo.drift.detected on drift) and artifact."""
    from pneumo import drift as drifts, predict

    try:
        outcome = drifts.check_source(source, where.registry_uri(), where.model_name, version, where.workdir)
    except (predict.CardError, predict.ModelNotFound, ValueError, OSError) as error:
        fail(str(error))
    print(json.dumps(outcome.record()) if as_json else "\n".join(outcome.lines()), flush=True)
    if outcome.report is not None:
        from cli import runtime

        with runtime.prefect_api():
            from tasks.drift import publish

            publish(outcome, "command", source)
    return 0


def serve(
    *,
    where: Where = ModelLocation(),
    alias: Annotated[str, Parameter(help="Alias to serve; the server follows it when it moves.")] = "champion",
    host: Annotated[str, Parameter(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, Parameter(help="Port to listen on.")] = 8000,
    poll: Annotated[float, Parameter(help="Seconds between checks of where the alias points.")] = 60.0,
    max_bytes: Annotated[int, Parameter(help="Largest upload accepted, per image.")] = 20_000_000,
    max_pixels: Annotated[int, Parameter(help="Largest image accepted, in pixels.")] = 50_000_000,
    body_timeout: Annotated[float, Parameter(help="Seconds a request body may take to arrive (then 408).")] = 30.0,
    max_connections: Annotated[int, Parameter(help="Open connections and requests at once; more get 503.")] = 100,
    decode_memory: Annotated[Optional[int], Parameter(
        help="MB of image decoding in flight across requests [default: 1/4 of RAM or cgroup limit, 256 to 2048, <= 1/2 of ulimit -v left].", show_default=False)] = None,
) -> None:
    """Serve the model over HTTP: POST /predict, POST /predict/batch, GET /health, GET /model.

    No TLS and no authentication: exposed beyond this machine (--host), put it behind a reverse
    proxy that terminates TLS, authenticates and times out slow clients (see the README).
    """
    import uvicorn

    from pneumo import serve as serving

    if poll < 0.1 or min(max_bytes, max_pixels, max_connections, decode_memory or 1) < 1 or body_timeout < 0.1:
        fail("--poll and --body-timeout take at least 0.1 s; sizes and counts at least 1")
    predictor = _load_predictor(where, alias, None, max_pixels=max_pixels)
    api = serving.create_app(
        where.registry_uri(), where.model_name, alias, poll_seconds=poll, max_bytes=max_bytes, max_pixels=max_pixels,
        body_seconds=body_timeout, decode_memory=decode_memory * 2**20 if decode_memory else None, predictor=predictor,
    )
    serving.log_requests_to_stderr()
    print(f"pneumo: serving {where.model_name} {predictor.version} ({alias}, {predictor.runtime}) on http://{host}:{port}; "
          f"API docs at http://{host}:{port}/docs", file=sys.stderr)
    # A stalled upload must not hold the process after SIGTERM: requests still running half a second after it are cancelled.
    uvicorn.run(api, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS,
                limit_concurrency=max_connections, timeout_keep_alive=5)


def gc(
    *,
    where: Annotated[ModelLocation, Parameter(name="*")] = ModelLocation(),
    keep_recent: Annotated[str, Parameter(help="Keep what was modified, or used by a run that ended, this recently: 30m, 24h, 7d, 0.")] = "24h",
    only_aliased: Annotated[bool, Parameter(negative=(), help="Keep the inputs of aliased versions only (champion, latest, ...), not of every version.")] = False,
    yes: Annotated[bool, Parameter(negative=(), help="Remove what is listed as removable; without it nothing is removed.")] = False,
    as_json: Annotated[AsJson, Parameter(help="The plan as JSON.")] = False,
) -> None:
    """List what no registered version, alias or recent run needs (shards, manifests, stats, reports,
    downloads, predictions), with sizes; remove it with --yes.

    Never touched: the registry, Prefect's results, and anything at all while a run is running in the workdir.
    """
    from pneumo import cleanup

    try:
        plan = cleanup.plan(where.workdir, where.registry, keep_recent=cleanup.parse_duration(keep_recent), only_aliased=only_aliased)
    except ValueError as error:
        fail(str(error))
    print(cleanup.to_json(plan) if as_json else "\n".join([f"pneumo gc: {plan.workdir}", *cleanup.describe(plan)]))
    if plan.running:
        print(f"pneumo: {len(plan.running)} run(s) in progress in this workdir: nothing can be removed now", file=sys.stderr)
    if not yes:
        if plan.removable:
            print("nothing removed: add --yes to remove the items marked remove", file=sys.stderr)
        return
    try:
        freed = cleanup.remove(plan)
    except cleanup.RunInProgress as error:
        fail(str(error), code=1)
    print(f"removed {len(plan.removable)} item(s), {cleanup.human_bytes(freed)} freed", file=sys.stderr)
