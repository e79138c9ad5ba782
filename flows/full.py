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

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Literal, Optional  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from pneumo import download, shards, storage  # noqa: E402
from pneumo.config import KAGGLE_DEFAULT_SOURCE, SplitConfig, TrainConfig, TransformConfig  # noqa: E402
from pneumo.manifest import load_manifest  # noqa: E402
from tasks.download import download_dataset  # noqa: E402
from tasks.shards import write_index, write_shard  # noqa: E402
from tasks.sizes import size_percentiles  # noqa: E402
from tasks.train import train_evaluate_register  # noqa: E402

Runner = Literal["threads", "processes", "dask"]


def _absolute(uri: str) -> str:
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def _with_run_options(task: Any, workdir: str, retries: int) -> Any:
    """The task with the run's retry budget and its results persisted under the workdir."""
    options: dict[str, Any] = {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_jitter_factor": 0.5,
        "persist_result": True,
    }
    if not storage.is_s3(workdir):
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
    """The task runner for the mapped shard task. Processes by default: h5py holds a global lock."""
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers or os.cpu_count(), "threads_per_worker": 1, "processes": True}
    )


@flow(name="pneumo-shards", log_prints=True)
def shard_stage(specs: list[shards.ShardSpec], index_uri: str, workdir: str, retries: int) -> shards.IndexRef:
    """Write every shard (mapped over the flow's task runner), then the index."""
    logger = get_run_logger()
    shard_task = _with_run_options(write_shard, workdir, retries)
    futures = shard_task.map(specs)
    by_uri: dict[str, shards.ShardResult] = {}
    for done, future in enumerate(as_completed(futures), start=1):
        result = future.result()
        by_uri[result.uri] = result
        logger.info("shards: %d/%d done", done, len(specs))
    results = [by_uri[spec.uri] for spec in specs]

    # Cache hits whose shard files were deleted: rebuild just those.
    missing = [spec for spec, result in zip(specs, results) if not storage.exists(result.uri)]
    if missing:
        logger.warning("%d shard file(s) missing from storage; rebuilding them", len(missing))
        rebuilt = {r.uri: r for r in shard_task.with_options(refresh_cache=True).map(missing).result()}
        results = [rebuilt.get(r.uri, r) for r in results]

    index_task = _with_run_options(write_index, workdir, retries)
    first = specs[0]
    return _checked(
        index_task, lambda ref: [ref.uri], "index",
        results, index_uri, first.manifest_digest, first.transform, first.split_config,
    )


@flow(name="pneumo-full")
def full(
    source: str = KAGGLE_DEFAULT_SOURCE,
    workdir: str = "./pneumo-data",
    registry: Optional[str] = None,
    model_name: str = "tinynet",
    percentile: float = 75.0,
    shard_size: int = 1000,
    transform: TransformConfig = TransformConfig(),
    split: SplitConfig = SplitConfig(),
    train: TrainConfig = TrainConfig(),
    retries: int = 3,
    runner: Runner = "processes",
    workers: Optional[int] = None,
    dask_address: Optional[str] = None,
) -> dict[str, Any]:
    """Chest X-rays in, a registered 2,541-parameter pneumonia classifier out."""
    logger = get_run_logger()
    workdir = _absolute(workdir)
    registry = _absolute(registry) if registry else storage.join(workdir, "registry")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")

    # 1. Download: keyed on a cheap fingerprint of the source, so an unchanged source is a cache hit.
    fingerprint = download.source_fingerprint(source)
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
    shards_root = storage.join(workdir, "shards")
    specs = shards.plan_shards(load_manifest(manifest.uri), manifest.uri, split, transform, shard_size, shards_root)
    index_uri = shards.index_uri(shards_root, manifest.digest, transform, split, shard_size)
    logger.info("transform: %d images in %d shard(s) on the %s runner", manifest.n_images, len(specs), runner)
    index = shard_stage.with_options(task_runner=task_runner(runner, workers, dask_address))(
        specs, index_uri, workdir, retries
    )

    # 4. Train, evaluate and register.
    model = _checked(
        _with_run_options(train_evaluate_register, workdir, retries),
        lambda ref: [ref.card_uri, ref.model_uri], "train", index, manifest.digest, train, registry, model_name,
    )
    return {
        "model": f"{model_name} {model.version}",
        "card": model.card_uri,
        "metrics": model.metrics,
        "manifest": manifest.uri,
        "dataset_version": manifest.digest,
        "images": manifest.n_images,
        "quarantined": manifest.n_quarantined + index.n_quarantined,
        "shards_index": index.uri,
        "size_stats": sizes.uri,
        "registry": registry,
    }


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API, or start one temporary local server for this run.

    Prefect would start its ephemeral server lazily in each process, so every
    process-pool or Dask worker would boot a private server of its own (seconds each)
    and report its task runs there. One server, announced through PREFECT_API_URL,
    is shared by the whole run instead.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    # start() registers the server's stop at exit, which runs after Prefect's log and
    # event workers have drained: stopping it here would drop the run's last logs.
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python flows/full.py",
        description=(
            "Run the pneumo pipeline: download the chest X-ray dataset, compute image-size "
            "percentiles, transform the images into HDF5 shards, then train, evaluate and "
            "register a 2,541-parameter TinyNet. Works without a Prefect server (Prefect "
            "starts a temporary local one)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--source", default=KAGGLE_DEFAULT_SOURCE,
        help="kaggle:OWNER/DATASET (needs KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json), "
        "a folder in the Kaggle layout (train/NORMAL, train/PNEUMONIA, ...), a .zip of it, "
        "s3://bucket/archive.zip or an s3://bucket/prefix in that layout",
    )
    parser.add_argument("--workdir", default="./pneumo-data", help="root for downloads, stats, shards, registry and Prefect results (local path or s3://)")
    parser.add_argument("--registry", default=None, help="model registry root (default: WORKDIR/registry)")
    parser.add_argument("--model-name", default="tinynet", help="name the model is registered under")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum training epochs (early stopping may end sooner)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling, initialisation and shuffling")
    parser.add_argument("--percentile", type=float, default=75.0, help="image-size percentile that sets the resize target")
    parser.add_argument("--transform", choices=["fast", "exact"], default="fast", help="'exact' decodes every image at full resolution")
    parser.add_argument("--loss", choices=["hinge", "bce"], default=defaults.loss, help="training loss")
    parser.add_argument("--balance", choices=["downsample", "class_weights", "none"], default=defaults.balance, help="class-imbalance handling")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early-stopping patience in epochs")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per HDF5 shard")
    parser.add_argument("--runner", choices=["threads", "processes", "dask"], default="processes", help="task runner for the shard transform")
    parser.add_argument("--workers", type=int, default=None, help="parallel workers for the runner (default: CPU count)")
    parser.add_argument("--dask-address", default=None, help="scheduler of an existing Dask cluster, e.g. tcp://host:8786 (with --runner dask)")
    parser.add_argument("--retries", type=int, default=3, help="retries per task, with exponential backoff")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        train = TrainConfig(
            epochs=args.epochs, seed=args.seed, loss=args.loss, balance=args.balance, patience=args.patience
        )
        transform = TransformConfig(method=args.transform)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with prefect_api():
        summary = full(
            source=args.source, workdir=args.workdir, registry=args.registry, model_name=args.model_name,
            percentile=args.percentile, shard_size=args.shard_size, transform=transform, train=train,
            retries=args.retries, runner=args.runner, workers=args.workers, dask_address=args.dask_address,
        )
    print_summary(summary, time.perf_counter() - started)
    return 0


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    lines = [
        "",
        f"pneumo: {summary['model']} is registered ({seconds:.0f} s)",
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
        f"  card         {summary['card']}",
        f"  shards       {summary['shards_index']}",
        f"  manifest     {summary['manifest']}",
        f"  size stats   {summary['size_stats']}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
