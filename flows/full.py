"""The full pneumo pipeline: download → size percentiles → shards → quarantine report → train/evaluate/register.

Run it locally with ``python flows/full.py --help`` (or ``pneumo run``); deploy it with infra/prefect.yaml.
"""
# ruff: noqa: E402  (the __main__ check below runs before Prefect and torch are imported)

from __future__ import annotations

if __name__ == "__main__":
    # `python flows/full.py`: the command of `pneumo run` (flows/settings.py), whose settings are checked
    # before Prefect and torch are imported, so a bad value is refused at once with exit 2.
    from flows import runtime

    runtime.stop_on_interrupt()  # first: a Ctrl-C while the modules load is one line, no traceback, too
    from flows import settings

    def start(checked: settings.Settings) -> None:
        from flows import full  # this file again, as the module flows.full

        runtime.exit_process(full.run(checked))

    settings.run_app(start)(prog_name="python flows/full.py")

import os
import time
from typing import Any, Optional

from flows import runtime  # first: it sets Prefect's environment defaults
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run as this_flow_run
from prefect.states import Completed

from flows.settings import RUN_DEFAULTS, RunSettings, Runner, Settings, apply_recipe
from flows.summary import outcome_line, print_summary, summary_markdown
from pneumo import cleanup, download, pool, shards, shard_files, storage, workdir as layout
from pneumo.report import REPORT_NAME
from pneumo.config import SplitConfig, TrainConfig, TransformConfig
from pneumo.recipes import RecipeName
from pneumo.names import ChampionMetric, validate_model_name
from pneumo.registry import CHAMPION, describe_alias, list_versions
from tasks import progress
from tasks.download import download_dataset
from tasks.options import rerun_if_outputs_missing, task_runner, with_run_options
from tasks.quarantine import report_quarantine
from tasks.shards import write_index, write_shard
from tasks.sizes import size_percentiles
from tasks.register import train_evaluate_register


# The stages as Ctrl-C counts them (task names): each one finished is cached for the re-run.
STAGES = (download_dataset.name, size_percentiles.name, write_index.name, report_quarantine.name,
          train_evaluate_register.name)


def end_run_record(flow: Any, flow_run: Any, state: Any) -> None:
    """A failed, crashed or cancelled run's record says so: `pneumo gc` stops waiting for it."""
    workdir = layout.absolute(flow_run.parameters.get("workdir", RUN_DEFAULTS.workdir))
    cleanup.finish_run(workdir, str(flow_run.id), state.type.value.lower())


@flow(name="pneumo-full", on_failure=[end_run_record], on_crashed=[end_run_record], on_cancellation=[end_run_record])
def full(
    # Names, types and defaults are RunSettings' (flows/settings.py), which also checks the values in
    # the body. Prefect reads this signature from the source for a deployment's parameters, so it is
    # written out here; tests/code/test_run_settings.py keeps it equal to RunSettings.
    source: str = RUN_DEFAULTS.source,
    workdir: str = RUN_DEFAULTS.workdir,
    registry: Optional[str] = RUN_DEFAULTS.registry,
    model_name: str = RUN_DEFAULTS.model_name,
    percentile: float = RUN_DEFAULTS.percentile,
    shard_size: int = RUN_DEFAULTS.shard_size,
    recipe: RecipeName = RUN_DEFAULTS.recipe,
    transform: Optional[TransformConfig] = None,
    split: SplitConfig = SplitConfig(),
    train: Optional[TrainConfig] = None,
    champion_metric: ChampionMetric = RUN_DEFAULTS.champion_metric,
    retrain: bool = RUN_DEFAULTS.retrain,
    retries: int = RUN_DEFAULTS.retries,
    max_bad_fraction: float = RUN_DEFAULTS.max_bad_fraction,
    verify_source: bool = RUN_DEFAULTS.verify_source,
    runner: Runner = RUN_DEFAULTS.runner,
    workers: Optional[int] = RUN_DEFAULTS.workers,
    dask_address: Optional[str] = RUN_DEFAULTS.dask_address,
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
    # The values' ranges and choices are checked by RunSettings, where they are defined.
    RunSettings(**{name: value for name, value in locals().items() if name in RunSettings.model_fields})
    validate_model_name(model_name)
    transform, train = apply_recipe(recipe, transform, train)
    workdir = layout.absolute(workdir)
    registry = layout.absolute(registry) if registry else layout.registry(workdir)
    # Temporaries of killed runs (half-extracted folders, .tmp/.part files) are swept here.
    removed = download.sweep_workdir(layout.local_root(workdir), started)
    if removed:
        logger.info("removed %d temporary file(s)/folder(s) left by killed runs: %s",
                    len(removed), ", ".join(str(path) for path in removed))
    # While this record says "running", `pneumo gc` removes nothing from the workdir.
    run_id = str(this_flow_run.id)
    cleanup.start_run(workdir, run_id)

    def run_task(task: Any, *args: Any, outputs: Any, refresh: bool = False) -> Any:
        """``task(*args)`` with the run's retries and result storage, recomputed if its outputs are gone."""
        result = rerun_if_outputs_missing(with_run_options(task, workdir, retries, refresh=refresh), *args, outputs=outputs)
        runtime.finished_stage(task.name)  # persisted: a re-run after Ctrl-C takes it from the cache
        return result

    # 1. Download: keyed on a cheap fingerprint of the source, so an unchanged source is a cache hit.
    fingerprint = download.source_fingerprint(source, verify=verify_source)
    manifest = run_task(download_dataset, source, fingerprint, workdir, outputs=lambda ref: [ref.uri, ref.root])

    # 2. Size percentiles from image headers set the resize target.
    sizes = run_task(size_percentiles, manifest, workdir, percentile, outputs=lambda ref: [ref.uri])
    transform = transform.model_copy(update={"size": sizes.size})

    # 3. Transform and shard, mapped over the chosen task runner; shard tasks on this process's
    # threads advance the progress artifact image by image (tasks/progress.py).
    transform_progress = progress.open_stage("transform-progress", "transform", manifest.n_images, "images")
    try:
        index = shard_stage(manifest.uri, split, transform, shard_size, workdir, retries, runner, workers,
                            dask_address, root=manifest.root)
    finally:
        progress.close_stage(transform_progress)

    # Every input is in a shard or in the quarantine report; too much bad input stops here.
    quarantine_report = run_task(report_quarantine, manifest, index, workdir, max_bad_fraction, outputs=lambda uri: [uri])

    # 4. Train, evaluate, register, and challenge the champion.
    known_versions = list_versions(registry, model_name)
    model = run_task(train_evaluate_register, index, manifest.digest, train, registry, model_name, champion_metric, recipe,
                     outputs=lambda ref: [ref.card_uri, ref.model_uri], refresh=retrain)
    registered = model.version not in known_versions
    if not registered:
        logger.info(
            "data, config and code unchanged since %s %s: no new version registered (--retrain, or retrain=True, trains anyway)",
            model_name, model.version,
        )
    champion = describe_alias(registry, model_name, CHAMPION)
    if champion.startswith("broken"):
        logger.warning("champion alias %s", champion)

    report = model.card_uri.removesuffix("card.json") + REPORT_NAME  # a version registered before reports has none
    # 5. The summary, where `prefect deployment run --watch` and the UI look: the final state's message and an artifact.
    summary = {
        "model": f"{model_name} {model.version}", "version": model.version, "registered": registered,
        "champion": f"{model_name} {champion}", "champion_comparison": model.champion_comparison,
        "card": model.card_uri, "report": report if storage.exists(report) else None,
        "metrics": model.metrics, "manifest": manifest.uri, "dataset_version": manifest.digest,
        "images": manifest.n_images, "quarantined": manifest.n_quarantined + index.n_quarantined,
        "quarantine_report": quarantine_report, "shards_index": index.uri, "size_stats": sizes.uri, "registry": registry,
    }
    outcome = outcome_line(summary)
    logger.info("run summary: %s", outcome)
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary), description=outcome)
    cleanup.finish_run(workdir, run_id, "finished", manifest_digest=manifest.digest, shards_digest=index.digest)
    return Completed(message=outcome, data=summary)


def shard_stage(
    manifest_uri: str, split: SplitConfig, transform: TransformConfig, shard_size: int, workdir: str, retries: int,
    runner: Runner = "processes", workers: Optional[int] = None, dask_address: Optional[str] = None, *, root: str,
) -> shard_files.IndexRef:
    """Stage 3 in a flow run: the plan, one write-shard task per shard on ``runner``, then the index task.

    ``root`` is the folder this run's images are in (its ManifestRef.root). With ``processes``
    each shard task hands its pixel work to a pool of local processes forked from a warm
    forkserver, which compute within a second; Prefect's ProcessPoolTaskRunner spent ~3 s
    booting interpreters that import Prefect and its plugins and ~1.5 s tearing them down,
    45 % of this stage on 5,840 images. The stage is not a subflow for the same reason: a
    subflow run adds ~0.7 s.
    """
    logger = get_run_logger()
    transform_pool = pool.ProcessPool(workers or os.cpu_count() or 1) if runner == "processes" else None
    try:
        with task_runner(runner, workers, dask_address) as shard_runner:

            def write(specs: list[shard_files.ShardSpec], rebuild: bool = False) -> list[shard_files.ShardResult]:
                logger.info("transform: %d shard(s) of up to %d images on the %s runner", len(specs), shard_size, runner)
                shard_task = with_run_options(write_shard, workdir, retries, refresh=rebuild)
                futures = shard_runner.map(shard_task, {"spec": specs, "pool": unmapped(transform_pool)})
                by_uri: dict[str, shard_files.ShardResult] = {}
                for done, future in enumerate(as_completed(futures), start=1):
                    result = future.result()
                    by_uri[result.uri] = result
                    logger.info("shards: %d/%d done", done, len(specs))
                return [by_uri[spec.uri] for spec in specs]

            plan = shards.plan(manifest_uri, root, split, transform, shard_size, workdir)
            results = write(plan.specs)
            # A cached result remembers a shard, not its file: one deleted or changed since is rebuilt.
            broken = shards.set_aside_broken(plan.specs, results)
            for spec, problem in broken:
                logger.warning("shard %s: %s; rebuilding it", spec.uri, problem)
            if broken:
                results = shards.with_rebuilt(results, write([spec for spec, _ in broken], rebuild=True))
    finally:
        if transform_pool:
            transform_pool.close()
    index = rerun_if_outputs_missing(with_run_options(write_index, workdir, retries), plan, results,
                                     outputs=lambda ref: [ref.uri])
    runtime.finished_stage(write_index.name)
    return index


def run(settings: Settings) -> int:
    """`pneumo run` and `python flows/full.py`: the flow with checked settings, under flows/runtime.py; the exit code."""
    return runtime.run_flow(full, settings.flow_parameters(), print_summary, stages=STAGES, verbose=settings.verbose)
