"""How good is each named recipe, and how well does it hold up under acquisition shifts?

For each recipe of pneumo.recipes: build its shards once (the library's plan_shards and
write_shard, in a process pool), then train TinyNet with several seeds on the same carved,
patient-grouped split and report mean +- sd over the seeds of

- carved-val ROC AUC, accuracy, specificity (the split early stopping watched),
- the shift suite's worst case (pneumo.shift) over val and test together: ROC AUC and
  specificity, each the minimum over the shifts,
- the training time (TinyNet on the train rows, renditions included, one thread): wall
  seconds, and CPU seconds, which on a shared, busy machine estimate the idle wall time.

The carved splits come from the same period as train; the shift suite is the proxy for
films of another period. Prints a markdown table for the README, then the figures as JSON.

    python benchmarks/quality.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pneumo import evaluate, shard_files, shift
from pneumo.config import SplitConfig
from pneumo.download import build_manifest
from pneumo.recipes import RECIPES
from pneumo.sizes import size_percentiles, target_size
from pneumo.model import predict_proba
from pneumo.train import train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"
SHARD_SIZE = 1000


def build_shards(manifest, recipe: str, size: tuple[int, int], out_dir: str, workers: int) -> tuple[str, float]:
    """The recipe's shards (reused when already written); their index URI and the seconds it took."""
    transform = RECIPES[recipe].transform.model_copy(update={"size": size})
    split = SplitConfig()
    specs = shard_files.plan_shards(manifest, split, transform, SHARD_SIZE, out_dir)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(shard_files.write_shard, specs))
    seconds = time.perf_counter() - started
    index_uri = shard_files.index_uri(out_dir, manifest.digest(), transform, split, SHARD_SIZE)
    shard_files.write_index(results, index_uri, manifest_digest=manifest.digest(), transform=transform, split_config=split)
    return index_uri, seconds


def run_seed(data: dict[str, shard_files.ShardData], recipe: str, seed: int, epochs: int | None) -> dict:
    """Train one seed; its carved-val metrics, the shift suite's worst case and the training time."""
    update = {"seed": seed} if epochs is None else {"seed": seed, "epochs": epochs}
    config = RECIPES[recipe].train.model_copy(update=update)
    cpu = time.process_time()
    result = train(data["train"].features, data["train"].labels, data["val"].features, data["val"].labels, config)
    cpu = time.process_time() - cpu  # TinyNet trains on one thread: its CPU time is what an idle machine's wall time would be
    val = evaluate.metrics(data["val"].labels, predict_proba(result.state_dict, data["val"].features), config.threshold)
    test = evaluate.metrics(data["test"].labels, predict_proba(result.state_dict, data["test"].features), config.threshold)
    # The shift suite over val and test together: twice the rows, half the noise of either.
    labels = np.concatenate([data["val"].labels, data["test"].labels])
    probs = {"clean": predict_proba(result.state_dict, np.concatenate([data["val"].features, data["test"].features]))}
    for name in shift.NAMES:
        rows = np.concatenate([data["val"].shift[name], data["test"].shift[name]])
        probs[name] = predict_proba(result.state_dict, rows)
    shifted = shift.shift_metrics(labels, probs, config.threshold)
    return {
        "seed": seed,
        "val_auc": val["roc_auc"],
        "val_accuracy": val["accuracy"],
        "val_specificity": val["specificity"],
        "test_auc": test["roc_auc"],
        "shift_worst_auc": shifted["worst"]["roc_auc"][0],
        "shift_worst_auc_shift": shifted["worst"]["roc_auc"][1],
        "shift_worst_specificity": shifted["worst"]["specificity"][0],
        "shift_worst_specificity_shift": shifted["worst"]["specificity"][1],
        "shift_clean_specificity": shifted["clean"]["specificity"],
        "train_seconds": result.seconds,
        "train_cpu_seconds": cpu,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "n_train_rows": result.n_train,
    }


COLUMNS = [
    ("val_auc", "val AUC", 3),
    ("val_accuracy", "val accuracy", 3),
    ("val_specificity", "val specificity", 3),
    ("shift_worst_auc", "shift worst AUC", 3),
    ("shift_worst_specificity", "shift worst specificity", 3),
    ("train_seconds", "train s", 1),
    ("train_cpu_seconds", "train CPU s", 1),
]


def _cell(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(report: dict) -> str:
    lines = [
        "| recipe | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for recipe, runs in report["recipes"].items():
        cells = [_cell([run[key] for run in runs["seeds"]], digits) if key in runs["seeds"][0] else "n/a"
                 for key, _, digits in COLUMNS]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description="Train every named recipe with several seeds on the same carved split of the real data; "
        "print mean +- sd of val AUC, accuracy, specificity, the shift suite's worst-case AUC and specificity, "
        "and the training time, as a markdown table, then the figures as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", type=Path, default=SHARED_DATA, help="a folder in the Kaggle layout")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-quality"), help="where the shards go (reused)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 per recipe")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's maximum epochs")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing shards")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--table-from", type=Path, nargs="+", default=None,
                        help="print the table of earlier --json reports (their recipes together) and exit")
    args = parser.parse_args(argv)
    if args.table_from:
        reports = [json.loads(path.read_text()) for path in args.table_from]
        print(table({"recipes": {name: runs for report in reports for name, runs in report["recipes"].items()}}))
        return 0
    if not (args.source / "train").is_dir():
        print(f"error: {args.source} has no train/ folder (see ../shared/data/chest_xray_224/README.md)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    manifest = build_manifest(args.source)
    size = target_size(size_percentiles(manifest), 75.0)
    report = {"source": str(args.source), "images": len(manifest.records), "cpu_count": os.cpu_count(), "recipes": {}}
    for recipe in args.recipes:
        index_uri, shard_seconds = build_shards(manifest, recipe, size, str(args.workdir / "shards"), args.workers)
        data = {split: shard_files.load_split(index_uri, split) for split in ("train", "val", "test")}
        runs = []
        for seed in range(args.seeds):
            runs.append(run_seed(data, recipe, seed, args.epochs))
            print(f"{recipe} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in runs[-1].items() if k != "seed"), flush=True)
        report["recipes"][recipe] = {
            "shard_seconds": shard_seconds,
            "rows": {split: len(part.labels) for split, part in data.items()},
            "seeds": runs,
        }
    report["seconds"] = time.perf_counter() - started

    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{report['images']} images of {args.source}, {args.seeds} seeds per recipe, {os.cpu_count()} cores "
          f"(`{command.strip()}`):\n")
    print(table(report))
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
