"""The full pneumo pipeline: download → size percentiles → shards → quarantine report → train/evaluate/register.

Run by ``pneumo run`` (= ``python flows/full.py``), deployed by infra/prefect.yaml. Its parameters are RunConfig's
sections: ``prefect deployment run --param train='{"epochs": 5}'`` changes the recipe's epochs and keeps the rest.
"""

# ruff: noqa: E402  (the __main__ check runs before Prefect is imported)
from __future__ import annotations

if __name__ == "__main__":
    # `python flows/full.py [options]` is `pneumo run [options]`: the command line goes to the CLI
    # (cli/run.py), which checks it before Prefect is imported. Run, not imported: flows sit below cli.
    import runpy
    import sys

    sys.argv[1:1] = ["run"]
    runpy.run_module("cli", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import os
import time
from typing import Any, Optional

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as this_flow_run
from prefect.states import Completed

from pneumo import cleanup, download, markdown as md, pool, shards, shard_files, workdir as layout
from pneumo.config import RunConfig, RunOptions, SplitConfig, TrainConfig, TransformConfig
from pneumo.registry import list_versions
from pneumo.summary import outcome_line, run_summary, summary_markdown
from tasks import progress
from tasks.download import download_dataset
from tasks.drift import check_training_data
from tasks.options import rerun_if_outputs_missing, task_runner, with_run_options
from tasks.quarantine import report_quarantine
from tasks.register import train_evaluate_register
from tasks.shards import write_index, write_shard
from tasks.sizes import size_percentiles

DEFAULTS = RunConfig()  # the flow's defaults are the config's: Prefect reads them from this signature


def end_run_record(flow: Any, flow_run: Any, state: Any) -> None:
    """A failed, crashed or cancelled run's record says so: `pneumo gc` stops waiting for it."""
    workdir = flow_run.parameters.get("workdir") or DEFAULTS.workdir
    cleanup.finish_run(layout.absolute(workdir), str(flow_run.id), state.type.value.lower())


@flow(name="pneumo-full", on_failure=[end_run_record], on_crashed=[end_run_record], on_cancellation=[end_run_record])
def full(
    # Where: the top-level fields of RunConfig, so a deployment's stay when a run overrides a section.
    source: str = DEFAULTS.source,
    workdir: str = DEFAULTS.workdir,
    registry: Optional[str] = DEFAULTS.registry,
    model_name: str = DEFAULTS.model_name,
    run: RunOptions = RunOptions(),
    transform: TransformConfig = TransformConfig(),
    split: SplitConfig = SplitConfig(),
    train: TrainConfig = TrainConfig(),
) -> dict[str, Any]:
    """Chest X-rays in, a registered 2,541-parameter pneumonia classifier out.

    ``run.recipe`` (pneumo.recipes) supplies every value not given explicitly. The new version
    becomes `champion` when it is the first one, or when its ``run.champion_metric`` is strictly
    greater than the champion's. Unchanged data, config and code make a run a cache hit that
    registers nothing; ``run.retrain`` trains and registers a new version anyway.
    """
    logger = get_run_logger()
    config = RunConfig(source=source, workdir=workdir, registry=registry, model_name=model_name,
                       run=run, transform=transform, split=split, train=train)  # the recipe, applied once
    run = config.run
    workdir = layout.absolute(config.workdir)
    removed = download.sweep_workdir(layout.local_root(workdir), time.time())  # temporaries of killed runs
    if removed:
        logger.info("removed %d temporary file(s)/folder(s) left by killed runs", len(removed))
    run_id = str(this_flow_run.id)
    cleanup.start_run(workdir, run_id)  # while it says "running", `pneumo gc` removes nothing here

    def run_task(task: Any, *args: Any, outputs: Any, refresh: bool = False) -> Any:
        """``task(*args)`` with the run's retries and result storage, recomputed if its outputs are gone."""
        return rerun_if_outputs_missing(with_run_options(task, workdir, run.retries, refresh=refresh), *args, outputs=outputs)

    # 1. Download, keyed on a cheap fingerprint of the source; 2. the size percentile sets the resize target.
    fingerprint = download.source_fingerprint(config.source, verify=run.verify_source)
    manifest = run_task(download_dataset, config.source, fingerprint, workdir, config.transform.accept_lateral,
                        outputs=lambda ref: [ref.uri, ref.root])
    sizes = run_task(size_percentiles, manifest, workdir, run.percentile, outputs=lambda ref: [ref.uri])
    transform = config.transform.model_copy(update={"size": sizes.size})

    # 3. Transform and shard: write-shard mapped over the plan on the chosen runner, then the index.
    plan = shards.plan(manifest.uri, manifest.root, config.split, transform, run.shard_size, workdir)
    stage = progress.open_stage("transform-progress", "transform", manifest.n_images, "images")
    try:
        results = write_shards(plan.specs, config, workdir)
        broken = shards.set_aside_broken(plan.specs, results)  # cached results whose files went missing or changed
        for spec, problem in broken:
            logger.warning("shard %s: %s; rebuilding it", spec.uri, problem)
        if broken:
            results = shards.with_rebuilt(results, write_shards([spec for spec, _ in broken], config, workdir, rebuild=True))
    finally:
        progress.close_stage(stage)
    index = run_task(write_index, plan, results, outputs=lambda ref: [ref.uri])
    quarantine_report = run_task(report_quarantine, manifest, index, workdir, run.max_bad_fraction, outputs=lambda uri: [uri])

    # 4. Train, evaluate, register, and challenge the champion; the card keeps the run's settings.
    registry = config.registry_uri()
    known, drift = list_versions(registry, config.model_name), check_training_data(index, registry, config.model_name, config.source)
    model = run_task(train_evaluate_register, index, manifest.digest, config.train, registry, config.model_name,
                     run.champion_metric, run.recipe, config.model_dump(mode="json", exclude={"transform", "split", "train"}),
                     drift, outputs=lambda ref: [ref.card_uri, ref.model_uri], refresh=run.retrain)

    # 5. The summary, where `prefect deployment run --watch` and the UI look: the final state's message and an artifact.
    summary = run_summary(config, registry, manifest, sizes, index, quarantine_report, model, known, logger)
    outcome = outcome_line(summary)
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary), description=md.text(outcome))
    cleanup.finish_run(workdir, run_id, "finished", manifest_digest=manifest.digest, shards_digest=index.digest)
    return Completed(message=outcome, data=summary)


def write_shards(specs: list[shard_files.ShardSpec], config: RunConfig, workdir: str,
                 rebuild: bool = False) -> list[shard_files.ShardResult]:
    """write-shard mapped over ``specs`` on the run's task runner; results in spec order. With ``processes`` the
    pixel work goes to a pool of local processes (h5py holds a global lock, so threads alone do not scale).
    """
    run = config.run
    get_run_logger().info("transform: %d shard(s) of up to %d images on the %s runner", len(specs), run.shard_size, run.runner)
    transform_pool = pool.ProcessPool(run.workers or os.cpu_count() or 1) if run.runner == "processes" else None
    try:
        with task_runner(run.runner, run.workers, run.dask_address) as runner:
            task = with_run_options(write_shard, workdir, run.retries, refresh=rebuild)
            return [future.result() for future in runner.map(task, {"spec": specs, "pool": unmapped(transform_pool)})]
    finally:
        if transform_pool:
            transform_pool.close()

