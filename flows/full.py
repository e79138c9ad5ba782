"""The full pneumo pipeline: download → size percentiles → shards → train/evaluate/register.

Run it locally with ``python flows/full.py --help``; deploy it with infra/prefect.yaml.
"""

from __future__ import annotations

import os

# Before Prefect is imported: a fresh ephemeral API server needs ~18 s of database
# migrations here, close to Prefect's 20 s default; its telemetry only adds noise.
# Both are defaults, so a user's own setting always wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __name__ == "__main__":
    # `python flows/full.py`: the settings are checked before Prefect and torch are imported
    # (seconds on a busy machine), so a bad value is refused at once, as by `pneumo run`.
    from flows import settings as _early_settings

    CHECKED = _early_settings.load(None, "python flows/full.py")
    if CHECKED is None:  # --print-config
        raise SystemExit(0)

import contextlib  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Callable, Optional  # noqa: E402

from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.states import Completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from pydantic import Field  # noqa: E402

from pneumo import download, pool, shards, shard_files, storage  # noqa: E402
from pneumo.config import SplitConfig, TrainConfig, TransformConfig  # noqa: E402
from pneumo.recipes import RECIPES, RecipeName  # noqa: E402
from pneumo.names import ChampionMetric, validate_model_name  # noqa: E402
from pneumo.registry import CHAMPION, describe_alias, list_versions  # noqa: E402
from tasks.download import download_dataset  # noqa: E402
from tasks import progress  # noqa: E402
from tasks.quarantine import report_quarantine  # noqa: E402
from tasks.results import s3_result_storage  # noqa: E402
from tasks.retry import is_retryable, retry_options  # noqa: E402
from tasks.shards import write_index, write_shard  # noqa: E402
from tasks.sizes import size_percentiles  # noqa: E402
from tasks.register import train_evaluate_register  # noqa: E402

from flows import settings as settings_module  # noqa: E402
from flows.settings import RUN_DEFAULTS as D, Runner  # noqa: E402


def _absolute(uri: str) -> str:
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def _with_run_options(task: Any, workdir: str, retries: int) -> Any:
    """The task with the run's retry budget (under the one policy, tasks/retry.py) and its results persisted under the workdir."""
    options: dict[str, Any] = {**retry_options(retries), "persist_result": True}
    if storage.is_s3(workdir):
        options["result_storage"] = s3_result_storage(workdir)
    else:
        options["result_storage"] = Path(workdir, "prefect-results")
    return task.with_options(**options)


def _checked(call: Callable[..., Any], outputs: Callable[[Any], list[str]], what: str, *args: Any, **kwargs: Any) -> Any:
    """Run a cached task; if its recorded outputs are gone, run it again for real.

    Prefect's cache remembers results, not files: a cache hit whose files were deleted
    must recompute rather than hand a dangling reference downstream.
    """
    result = call(*args, **kwargs)
    missing = [uri for uri in outputs(result) if not storage.exists(uri)]
    if not missing:
        return result
    get_run_logger().warning("%s: %d output(s) missing (e.g. %s); recomputing", what, len(missing), missing[0])
    return call.with_options(refresh_cache=True)(*args, **kwargs)


def task_runner(runner: Runner, workers: Optional[int] = None, dask_address: Optional[str] = None):
    """The Prefect task runner for the mapped shard task.

    ``processes`` runs the tasks on threads, which hand their pixel work to a local process
    pool (see ``shard_stage``): h5py holds a global lock, so threads alone do not scale.
    """
    if runner in ("threads", "processes"):
        # One thread per worker process: a task's run time is then its shard's own.
        return ThreadPoolTaskRunner(max_workers=workers or os.cpu_count())
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers or os.cpu_count(), "threads_per_worker": 1, "processes": True}
    )


def shard_stage(
    manifest_uri: str,
    split: SplitConfig,
    transform: TransformConfig,
    shard_size: int,
    workdir: str,
    retries: int,
    runner: Runner = "processes",
    workers: Optional[int] = None,
    dask_address: Optional[str] = None,
    *,
    root: str,
) -> shard_files.IndexRef:
    """Stage 3 in a flow run: pneumo.shards's steps, with one write-shard task per shard on ``runner``.

    Plan, map the write-shard task, rebuild the shards found broken, then the index task.

    ``root`` is the folder this run's images are in (its ManifestRef.root). With ``processes``
    each shard task hands its pixel work to a pool of local processes forked from a warm
    forkserver, which compute within a second; Prefect's ProcessPoolTaskRunner spent ~3 s
    booting interpreters that import Prefect and its plugins and ~1.5 s tearing them down,
    45 % of this stage on 5,840 images. The stage is not a subflow for the same reason: a
    subflow run adds ~0.7 s.
    """
    logger = get_run_logger()
    plan = shards.plan(manifest_uri, root, split, transform, shard_size, workdir)
    logger.info("transform: %d shard(s) of up to %d images on the %s runner", len(plan.specs), shard_size, runner)
    shard_task = _with_run_options(write_shard, workdir, retries)
    transform_pool = pool.ProcessPool(workers or os.cpu_count() or 1) if runner == "processes" else None
    try:
        with task_runner(runner, workers, dask_address) as shard_runner:
            results = _map_shards(shard_runner, shard_task, plan.specs, transform_pool)
            # A cache hit remembers a shard, not its file: one deleted or changed since is rebuilt, never trusted.
            broken = shards.set_aside_broken(plan.specs, results)
            for spec, problem in broken:
                logger.warning("shard %s: %s; rebuilding it", spec.uri, problem)
            if broken:
                rebuild = shard_task.with_options(refresh_cache=True)
                rebuilt = _map_shards(shard_runner, rebuild, [spec for spec, _ in broken], transform_pool)
                results = shards.with_rebuilt(results, rebuilt)
    finally:
        if transform_pool:
            transform_pool.close()
    index_task = _with_run_options(write_index, workdir, retries)
    return _checked(
        index_task, lambda ref: [ref.uri], "index",
        results, plan.index_uri, plan.manifest_digest, plan.transform, plan.split,
    )


def _map_shards(
    shard_runner: Any, shard_task: Any, specs: list[shard_files.ShardSpec], transform_pool: Optional[pool.ProcessPool]
) -> list[shard_files.ShardResult]:
    """The shard task mapped over ``specs`` on the task runner; results in spec order."""
    logger = get_run_logger()
    futures = shard_runner.map(shard_task, {"spec": specs, "pool": unmapped(transform_pool)})
    by_uri: dict[str, shard_files.ShardResult] = {}
    for done, future in enumerate(as_completed(futures), start=1):
        result = future.result()
        by_uri[result.uri] = result
        logger.info("shards: %d/%d done", done, len(specs))
    return [by_uri[spec.uri] for spec in specs]


@flow(name="pneumo-full")
def full(
    # Defaults and ranges are RunSettings' (flows/settings.py); tests/code/test_run_settings.py keeps them equal.
    source: str = D.source,
    workdir: str = D.workdir,
    registry: Optional[str] = D.registry,
    model_name: str = D.model_name,
    percentile: Annotated[float, Field(gt=0, lt=100)] = D.percentile,
    shard_size: Annotated[int, Field(ge=1)] = D.shard_size,
    recipe: RecipeName = D.recipe,
    transform: Optional[TransformConfig] = None,
    split: SplitConfig = SplitConfig(),
    train: Optional[TrainConfig] = None,
    champion_metric: ChampionMetric = D.champion_metric,
    retrain: bool = D.retrain,
    retries: Annotated[int, Field(ge=0, le=20)] = D.retries,
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = D.max_bad_fraction,
    verify_source: bool = D.verify_source,
    runner: Runner = D.runner,
    workers: Optional[Annotated[int, Field(ge=1)]] = D.workers,
    dask_address: Optional[str] = D.dask_address,
) -> dict[str, Any]:
    """Chest X-rays in, a registered 2,541-parameter pneumonia classifier out.

    The new version becomes `champion` when it is the first one, or when its val
    ``champion_metric`` is strictly greater than the champion's. Unchanged data, config and
    code make a run a cache hit that registers nothing; ``retrain=True`` (the scheduled
    deployment) trains and registers a new version anyway, while the data stages stay cached.
    ``verify_source=True`` keys the download on the sha256 of every source file instead of
    their sizes and mtimes, so a same-size rewrite with its mtime set back is seen.
    ``recipe`` names the transform and training preset (pneumo.recipes); the fields given
    in ``transform`` and ``train`` override the recipe's, the others keep its values.
    """
    logger = get_run_logger()
    started = time.time()
    transform, train = with_recipe(recipe, transform, train)
    workdir = _absolute(workdir)
    registry = _absolute(registry) if registry else storage.join(workdir, "registry")
    # Temporaries of killed runs (half-extracted folders, .tmp/.part files) are swept here.
    for folder in [workdir] if not storage.is_s3(workdir) else [str(Path.home() / ".cache/pneumo")]:
        removed = download.sweep_workdir(folder, started)
        if removed:
            logger.info("removed %d temporary file(s)/folder(s) left by killed runs: %s",
                        len(removed), ", ".join(str(path) for path in removed))
    validate_model_name(model_name)
    if runner == "processes":
        pool.warm_up()  # the transform's workers get ready while stages 1 and 2 run

    # 1. Download: keyed on a cheap fingerprint of the source, so an unchanged source is a cache hit.
    fingerprint = download.source_fingerprint(source, verify=verify_source)
    manifest = _checked(
        _with_run_options(download_dataset, workdir, retries),
        lambda ref: [ref.uri, ref.root], "download", source, fingerprint, workdir,
    )

    # 2. Size percentiles from image headers set the resize target.
    sizes = _checked(
        _with_run_options(size_percentiles, workdir, retries),
        lambda ref: [ref.uri], "size percentiles", manifest, workdir, percentile,
    )
    transform = transform.model_copy(update={"size": sizes.size})

    # 3. Transform and shard, mapped over the chosen task runner.
    # Shard tasks on this process's threads advance it image by image (tasks/progress.py).
    transform_progress = progress.open_stage("transform-progress", "transform", manifest.n_images, "images")
    try:
        index = shard_stage(
            manifest.uri, split, transform, shard_size, workdir, retries, runner, workers, dask_address, root=manifest.root
        )
    finally:
        progress.close_stage(transform_progress)

    # Every input is in a shard or in the quarantine report; too much bad input stops here.
    quarantine_report = _checked(
        _with_run_options(report_quarantine, workdir, retries),
        lambda uri: [uri], "quarantine report", manifest, index, workdir, max_bad_fraction,
    )

    # 4. Train, evaluate, register, and challenge the champion.
    train_task = _with_run_options(train_evaluate_register, workdir, retries)
    if retrain:
        train_task = train_task.with_options(refresh_cache=True)
    known_versions = list_versions(registry, model_name)
    model = _checked(
        train_task, lambda ref: [ref.card_uri, ref.model_uri], "train",
        index, manifest.digest, train, registry, model_name, champion_metric, recipe,
    )
    registered = model.version not in known_versions
    if not registered:
        logger.info(
            "data, config and code unchanged since %s %s: no new version registered (--retrain, or retrain=True, trains anyway)",
            model_name, model.version,
        )
    champion = describe_alias(registry, model_name, CHAMPION)
    if champion.startswith("broken"):
        logger.warning("champion alias %s", champion)
    summary = {
        "model": f"{model_name} {model.version}",
        "version": model.version,
        "registered": registered,
        "champion": f"{model_name} {champion}",
        "champion_comparison": model.champion_comparison,
        "card": model.card_uri,
        "metrics": model.metrics,
        "manifest": manifest.uri,
        "dataset_version": manifest.digest,
        "images": manifest.n_images,
        "quarantined": manifest.n_quarantined + index.n_quarantined,
        "quarantine_report": quarantine_report,
        "shards_index": index.uri,
        "size_stats": sizes.uri,
        "registry": registry,
    }
    # Where `prefect deployment run --watch` and the UI look: the final state's message and an artifact.
    outcome = outcome_line(summary)
    logger.info("run summary: %s", outcome)
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary), description=outcome)
    return Completed(message=outcome, data=summary)


def outcome_line(summary: dict[str, Any]) -> str:
    """One line: what was registered (or not), the champion, and the val/test AUC."""
    name, version = summary["model"].rsplit(" ", 1)
    if summary["registered"]:
        head = f"registered {name} {version}"
    else:
        head = f"nothing new registered (cache hit; {name} {version} unchanged; --retrain to train anyway)"
    aucs = ", ".join(f"{split} AUC {_fmt((summary['metrics'].get(split) or {}).get('roc_auc'))}" for split in ("val", "test"))
    return f"{head}; champion {summary['champion'].split(' ', 1)[1]}; {aucs}"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run-summary artifact: outcome, metrics per split, and where everything is."""
    metrics = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
    lines = [
        f"# {outcome_line(summary).split(';')[0]}", "",
        f"Champion: **{summary['champion']}**. Images: {summary['images']} ({summary['quarantined']} quarantined).", "",
        "| split | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics),
    ]
    for split in ("val", "test"):
        m = summary["metrics"].get(split) or {}
        lines.append(f"| {split} | {m.get('n', '-')} | " + " | ".join(_fmt(m.get(k)) for k in metrics) + " |")
    lines += ["", f"- card: `{summary['card']}`", f"- registry: `{summary['registry']}`",
              f"- shards: `{summary['shards_index']}`", f"- quarantine report: `{summary['quarantine_report']}`"]
    return "\n".join(lines) + "\n"


# Runs beside the temporary Prefect server: once the process that started both is gone
# (even by SIGKILL, which runs no atexit handler), it stops the server, so no orphaned
# uvicorn keeps ~250 MB and a port. It ends by itself when the server stops first.
_SERVER_WATCHER = """
import os, signal, sys, time
owner, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
while os.getppid() == owner and alive(server):
    time.sleep(0.5)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
"""


def _stop_with_owner(server_pid: int) -> subprocess.Popen:
    """Start the watcher that stops ``server_pid`` once this process is gone."""
    return subprocess.Popen(
        [sys.executable, "-c", _SERVER_WATCHER, str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def with_recipe(
    recipe: str, transform: Optional[TransformConfig] = None, train: Optional[TrainConfig] = None
) -> tuple[TransformConfig, TrainConfig]:
    """The recipe's configs with the fields set explicitly in ``transform`` and ``train`` replaced.

    Only explicitly given fields count (pydantic's ``model_fields_set``), so
    ``--param train='{"epochs": 50}'`` changes the epochs of the recipe, not the rest of it.
    """
    base = RECIPES[recipe]

    def merged(config, default):
        if config is None:
            return default
        return type(default)(**{**default.model_dump(), **config.model_dump(include=config.model_fields_set)})

    return merged(transform, base.transform), merged(train, base.train)


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API, or start one temporary local server for this run.

    Prefect would start its ephemeral server lazily in each process, so every
    process-pool or Dask worker would boot a private server of its own (seconds each)
    and report its task runs there. One server, announced through PREFECT_API_URL,
    is shared by the whole run instead. The server stops when this process ends, however
    it ends (see _SERVER_WATCHER).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    class OwnedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            process = super()._run_uvicorn_command()
            # Watched from its first second: a kill during the minute of migrations counts too.
            self.watcher = _stop_with_owner(process.pid)
            return process

    server = OwnedServer()
    # start() registers the server's stop at exit, which runs after Prefect's log and
    # event workers have drained: stopping it here would drop the run's last logs.
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def parse_args(argv: Optional[list[str]] = None, prog: str = "python flows/full.py") -> Optional[settings_module.Settings]:
    """The effective settings (flows/settings.py), checked before any service starts; exits 2 on a bad value."""
    return settings_module.load(argv, prog)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving its traceback out."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _failure_record(record: logging.LogRecord) -> bool:
    """Prefect's own reports of a failure, which the CLI sums up in one line at the end."""
    message = str(record.msg)
    if message.startswith("Finished in state Failed"):  # INFO for a flow run, ERROR for a task run
        return True
    return record.levelno >= logging.ERROR and (
        record.exc_info is not None
        or message.startswith("Task run failed with exception")
        or message.startswith("Encountered exception during execution")
    )


def _terminal_without_tracebacks() -> None:
    """Tracebacks and repeated failure lines go to the Prefect log only, not to the terminal."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
                handler.addFilter(lambda record: not _failure_record(record))


def _api_unreachable(url: Optional[str], timeout: float = 3.0) -> bool:
    """True when nothing answers at the API's address (any HTTP answer counts as alive)."""
    if not url:
        return False
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError:
        return True
    return False


API_GONE_AFTER_SECONDS = 30.0


def _watch_api(url: Optional[str], on_gone: Callable[[float], None], every: float = 5.0,
               gone_after: float = API_GONE_AFTER_SECONDS) -> threading.Event:
    """Call ``on_gone(seconds)`` once the API has not answered for ``gone_after`` seconds; set the event to stop.

    A task that computes (training, a transform) talks to the API only when it ends, so
    without this a run whose API died would go on for minutes, then fail on a refused
    connection that names nothing.
    """
    stop = threading.Event()

    def watch() -> None:
        last_answer = time.monotonic()
        while not stop.wait(every):
            if not _api_unreachable(url, timeout=every):
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer >= gone_after and not stop.is_set():
                on_gone(time.monotonic() - last_answer)
                return

    if url:
        threading.Thread(target=watch, name="prefect-api-watch", daemon=True).start()
    return stop


def _exit_api_gone(url: str) -> Callable[[float], None]:
    def exit_now(seconds: float) -> None:
        print(
            f"\npneumo: the Prefect API at {url} went away: no answer for {seconds:.0f} s.\n"
            "  Start it again (or unset PREFECT_API_URL to use a temporary one) and re-run the same command: "
            "the stages that finished are cached and are not repeated.",
            file=sys.stderr, flush=True,
        )
        sys.stdout.flush()
        # Nothing can be reported to a dead API, and Prefect's workers would retry it for minutes at exit.
        os._exit(1)

    return exit_now


def failure_message(error: BaseException, api_url: Optional[str], api_gone: bool) -> str:
    """Two lines: why the run failed, and what to do next."""
    if api_gone:
        return (
            f"pneumo: the Prefect API at {api_url} went away during the run ({type(error).__name__}: {error}).\n"
            "  Start it again (or unset PREFECT_API_URL to use a temporary one) and re-run the same command: "
            "the stages that finished are cached and are not repeated."
        )
    if is_retryable(error):
        hint = "retries exhausted; if the cause was passing, re-run the same command: finished stages are cached"
    else:
        hint = "not retried: trying again cannot fix this; correct what it names and re-run"
    return f"pneumo: the run failed: {error}\n  ({hint}; --verbose shows the traceback, the Prefect log always has it)"


@contextlib.contextmanager
def _bounded_api_retries():
    """Fewer Prefect client retries, so a Prefect API that died fails the run in about a minute.

    Prefect retries each failed request 5 times with 2, 4, ... 32 s waits (a minute per
    request, several requests in a row); 2 retries wait 2 + 4 s. A user's own setting wins.
    """
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if "PREFECT_CLIENT_MAX_RETRIES" in os.environ:
        yield
        return
    os.environ["PREFECT_CLIENT_MAX_RETRIES"] = str(CLI_CLIENT_MAX_RETRIES)  # for child processes
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: CLI_CLIENT_MAX_RETRIES}):
            yield
    finally:
        os.environ.pop("PREFECT_CLIENT_MAX_RETRIES", None)


CLI_CLIENT_MAX_RETRIES = 2
API_GONE = False  # set by main() when the run failed because the Prefect API went away


def main(argv: Optional[list[str]] = None, prog: str = "python flows/full.py") -> int:
    """`python flows/full.py` and `pneumo run`: check the settings, then run the flow."""
    settings = parse_args(argv, prog)
    if settings is None:  # --print-config
        return 0
    return run(settings)


def run(settings: settings_module.Settings) -> int:
    """Run the flow with checked settings (a temporary Prefect server unless PREFECT_API_URL is set)."""
    global API_GONE
    args, transform, train = settings.run, settings.transform, settings.train
    if not settings.verbose:
        _terminal_without_tracebacks()
    started = time.perf_counter()
    if args.runner == "processes":
        pool.warm_up()  # alongside the Prefect server's start
    with prefect_api(), _bounded_api_retries():
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        stop_watching = _watch_api(api_url, _exit_api_gone(api_url))
        try:
            summary = full(
                source=args.source, workdir=args.workdir, registry=args.registry, model_name=args.model_name,
                percentile=args.percentile, shard_size=args.shard_size, recipe=args.recipe, transform=transform, train=train,
                split=settings.split,
                retries=args.retries, max_bad_fraction=args.max_bad_fraction,
                champion_metric=args.champion_metric, retrain=args.retrain, verify_source=args.verify_source,
                runner=args.runner, workers=args.workers, dask_address=args.dask_address,
            )
        except Exception as error:  # the Prefect log has the traceback; end on the reason and the next step
            stop_watching.set()
            API_GONE = _api_unreachable(api_url)
            print(f"\n{failure_message(error, api_url, API_GONE)}", file=sys.stderr, flush=True)
            return 1
        stop_watching.set()
    print_summary(summary, time.perf_counter() - started)
    return 0


def closing_line(summary: dict[str, Any]) -> str:
    """What the run did to the registry, as the user's closing line says it."""
    if summary["registered"]:
        return f"registered {summary['model']}"
    return f"nothing new registered (cache hit; --retrain to train anyway): {summary['model']} is unchanged"


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    lines = [
        "",
        f"pneumo: {closing_line(summary)} ({seconds:.0f} s)",
        f"  images       {summary['images']} ({summary['quarantined']} quarantined)",
    ]
    for split in ("val", "test"):
        m = summary["metrics"][split]
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        lines.append(
            f"  {split:<5} n={m['n']:<5} accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  "
            f"recall {m['recall']:.3f}  specificity {m['specificity']:.3f}  F1 {m['f1']:.3f}  AUC {auc}"
        )
    lines += [
        f"  champion     {summary['champion']}",
        f"  card         {summary['card']}",
        f"  shards       {summary['shards_index']}",
        f"  manifest     {summary['manifest']}",
        f"  size stats   {summary['size_stats']}",
        f"  quarantine   {summary['quarantine_report']}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    code = run(CHECKED)
    if API_GONE:
        # Prefect's log and event workers would spend minutes at exit retrying a dead API.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
