"""How good is each named recipe, and how well does it hold up when films look different?

For each recipe of pneumo.recipes: build its shards once (the library's plan_shards and
write_shard, in a process pool), then train TinyNet with several seeds on the same carved,
patient-grouped split and report mean +- sd over the seeds of, all on the carved val split:

- clean val ROC AUC, accuracy, specificity (the split early stopping watched, if any),
- the stress val (pneumo.shift.stress_features: every val image under 10 random strong
  jitters, the same for every recipe): ROC AUC and specificity,
- the stretch shifts (the film's width or height x0.82 / x1.22): ROC AUC and specificity,
- the shift suite's worst case (pneumo.shift): ROC AUC and specificity, each the minimum
  over the shifts, on val and (as before issue 16) on val and test together, which halves
  the noise of either,
- the threshold the recipe's rule chose (0.5, or Youden's J on the stress val), which every
  specificity above uses,
- the training time (TinyNet on the train rows, renditions included, one thread): wall
  seconds, and CPU seconds, which on a shared, busy machine estimate the idle wall time.

Each recipe's models are scored twice (issue 24): in one pass ("-views" rows), and with the
test-time views of ``--views-recipe``'s transform (pneumo.views: 16 mild views; "+views"
rows), on every figure above, the threshold included; the shift suite's views are computed
here from the val films (``views.shifted_view_features``; not stored in shards) and cached in
the workdir. The val rows come from ``--views-recipe``'s shards for every recipe (the same
films and features; robust3 and robust4 differ only in training renditions and views).

The carved val comes from the same period as train: its clean figures reward shortcuts of
that period. The stress val, the stretches and the shift suite are proxies for films of
another period, made from the same val images. Prints a markdown table for the README,
then the figures as JSON.

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

import dataclasses

from pneumo import code_version, evaluate, features, shard_files, shards, shift, views
from pneumo.images import decode_gray
from pneumo.splits import records_by_split
from pneumo.config import SplitConfig, TrainConfig, TransformConfig
from pneumo.download import build_manifest
from pneumo.recipes import RECIPES
from pneumo.config import recipe
from pneumo.sizes import size_percentiles, target_size
from pneumo.model import predict_proba
from pneumo.train import train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"
SHARD_SIZE = 1000


def build_shards(manifest, transform, out_dir: str, workers: int) -> tuple[str, float]:
    """The shards of ``transform`` (reused when already written); their index URI and the seconds it took."""
    split = SplitConfig()
    specs = shards.plan_shards(manifest, split, transform, SHARD_SIZE, out_dir)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(shards.write_shard, specs))
    seconds = time.perf_counter() - started
    index_uri = shard_files.index_uri(out_dir, manifest.digest(), transform, split, SHARD_SIZE)
    shard_files.write_index(results, index_uri, manifest_digest=manifest.digest(), transform=transform, split_config=split)
    return index_uri, seconds


def _shift_views_one(args) -> np.ndarray:
    root, record, transform = args
    with features.read_verified(Path(root), record) as data:
        gray = decode_gray(data, transform)
    return views.shifted_view_features(gray, transform, record.sha256)


def shift_views(manifest, transform, val: shard_files.ShardData, cache: Path, workers: int) -> dict[str, np.ndarray]:
    """{shift name: (n, K, F)}: every val film of the shift suite under its views (cached in ``cache``)."""
    if cache.exists():
        with np.load(cache) as stored:
            return {name: stored[name] for name in shift.NAMES}
    records = records_by_split(manifest, SplitConfig())["val"]
    assert [r.relpath for r in records] == list(val.relpaths), "val records and shards differ"
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = np.stack(list(pool.map(_shift_views_one, [(manifest.images_root(), r, transform) for r in records], chunksize=8)))
    out = {name: rows[:, i] for i, name in enumerate(shift.NAMES)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def run_seed(data: dict[str, shard_files.ShardData], config, seed: int, val: shard_files.ShardData,
             shifted_views: dict[str, np.ndarray]) -> dict:
    """Train one seed on ``data["train"]``; its figures on ``val`` (with views) in one pass and with views."""
    config = config.model_copy(update={"seed": seed})
    cpu = time.process_time()
    result = train(data["train"].features, data["train"].labels, val.features, val.labels, config)
    cpu = time.process_time() - cpu  # TinyNet trains on one thread: its CPU time is what an idle machine's wall time would be
    plain = dataclasses.replace(val, views=None, stress_views=None)
    figures = {"-views": score(result.state_dict, config, plain, None, data["test"]),
               "+views": score(result.state_dict, config, val, shifted_views, None)}
    for mode in figures.values():
        mode.update({"seed": seed, "train_seconds": result.seconds, "train_cpu_seconds": cpu,
                     "epochs_run": len(result.history), "best_epoch": result.best_epoch, "n_train_rows": result.n_train})
    return figures


def score(state_dict, config, val: shard_files.ShardData, shifted_views, test) -> dict:
    """A model's figures on ``val`` scored with the views it holds (none: one pass); the val+test worst
    shift when ``test`` is given."""
    probability = lambda rows: predict_proba(state_dict, rows)  # noqa: E731
    stress_labels, stress_probs, _ = evaluate.stress_predictions(state_dict, val)
    threshold = evaluate.decision_threshold(state_dict, val, config.threshold_rule, config.threshold)
    clean_probs = views.film_scores(probability, val.features, val.views)
    clean = evaluate.metrics(val.labels, clean_probs, threshold)
    stressed = evaluate.metrics(stress_labels, stress_probs, threshold)
    probs = {"clean": clean_probs, **{
        name: views.film_scores(probability, val.shift[name], None if shifted_views is None else shifted_views[name])
        for name in shift.NAMES}}
    shifted = shift.shift_metrics(val.labels, probs, threshold)
    figures = {
        "threshold": threshold,
        "threshold": threshold,
        "val_auc": clean["roc_auc"],
        "val_accuracy": clean["accuracy"],
        "val_specificity": clean["specificity"],
        "val_sensitivity": clean["recall"],
        "stress_auc": stressed["roc_auc"],
        "stress_specificity": stressed["specificity"],
        "stress_sensitivity": stressed["recall"],
    }
    for name in STRETCHES:
        figures[f"{name}_auc"] = shifted["per_shift"][name]["roc_auc"]
        figures[f"{name}_specificity"] = shifted["per_shift"][name]["specificity"]
    figures.update({
        "shift_worst_auc": shifted["worst"]["roc_auc"][0],
        "shift_worst_auc_shift": shifted["worst"]["roc_auc"][1],
        "shift_worst_specificity": shifted["worst"]["specificity"][0],
        "shift_worst_specificity_shift": shifted["worst"]["specificity"][1],
    })
    if test is not None:
        both = {name: np.concatenate([probs[name], probability(test.shift[name])]) for name in shift.NAMES}
        both["clean"] = np.concatenate([clean_probs, probability(test.features)])
        pooled = shift.shift_metrics(np.concatenate([val.labels, test.labels]), both, threshold)
        figures.update({
            "valtest_worst_auc": pooled["worst"]["roc_auc"][0],
            "valtest_worst_auc_shift": pooled["worst"]["roc_auc"][1],
            "valtest_worst_specificity": pooled["worst"]["specificity"][0],
            "valtest_worst_specificity_shift": pooled["worst"]["specificity"][1],
        })
    return figures


STRETCHES = ("stretch_x0.82", "stretch_x1.22", "stretch_y0.82", "stretch_y1.22")
COLUMNS = [
    ("val_auc", "val AUC", 3),
    ("val_specificity", "val spec", 3),
    ("stress_auc", "stress AUC", 3),
    ("stress_specificity", "stress spec", 3),
    ("stretch_x0.82_auc", "width x0.82 AUC", 3),
    ("stretch_x0.82_specificity", "width x0.82 spec", 3),
    ("stretch_x1.22_auc", "width x1.22 AUC", 3),
    ("stretch_x1.22_specificity", "width x1.22 spec", 3),
    ("shift_worst_auc", "worst-shift AUC", 3),
    ("shift_worst_specificity", "worst-shift spec", 3),
    ("valtest_worst_auc", "worst-shift AUC, val+test", 3),
    ("valtest_worst_specificity", "worst-shift spec, val+test", 3),
    ("threshold", "threshold", 2),
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


def _report_from_logs(paths: list[Path]) -> dict:
    """The report's recipes from printed lines "LABEL MODE seed N: key value, ...", each seed once."""
    recipes: dict[str, dict[int, dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            head, _, figures = line.partition(": ")
            words = head.split()
            if len(words) < 3 or words[-2] != "seed" or not figures:
                continue
            run = {"seed": int(words[-1])}
            for item in figures.split(", "):
                key, _, value = item.partition(" ")
                run[key] = _value(value)
            recipes.setdefault(" ".join(words[:-2]), {})[run["seed"]] = run
    return {"recipes": {label: {"seeds": [runs[s] for s in sorted(runs)]} for label, runs in recipes.items()}}


def _value(text: str):
    return json.loads(text) if text[:1] in "[{0123456789-" or text in ("true", "false") else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description="Train every named recipe with several seeds on the same carved split of the real data; "
        "print mean +- sd of clean-val, stress-val, stretch and worst-shift AUC and specificity, the threshold "
        "and the training time, as a markdown table, then the figures as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", type=Path, default=SHARED_DATA, help="a folder in the Kaggle layout")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-quality"), help="where the shards go (reused)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["robust3", "robust4"])
    parser.add_argument("--views-recipe", choices=sorted(RECIPES), default="robust4",
                        help="the recipe whose val shards (and test-time views) every recipe is scored on")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 per recipe")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (split the seeds over processes)")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's maximum epochs")
    parser.add_argument("--set", nargs="+", default=[], metavar="PART.FIELD=VALUE",
                        help="override a recipe setting for an experiment, e.g. transform.renditions=6 "
                        "train.swa_start=0 transform.augment.aspect=0.15 (JSON values)")
    parser.add_argument("--label", default=None, help="name of the rows in the table (default: the recipe's name)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing shards")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--table-from", type=Path, nargs="+", default=None,
                        help="print the table of earlier --json reports (their recipes together) and exit")
    parser.add_argument("--table-from-logs", type=Path, nargs="+", default=None,
                        help="print the table of the per-seed lines of earlier runs' output (seeds split over processes) and exit")
    args = parser.parse_args(argv)
    if args.table_from_logs:
        print(table(_report_from_logs(args.table_from_logs)))
        return 0
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
    report = {"source": str(args.source), "images": len(manifest.records), "cpu_count": os.cpu_count(),
              "load_before": os.getloadavg(), "recipes": {}}
    viewed = recipe(args.views_recipe).transform.model_copy(update={"size": size})
    views_index, report["views_recipe_shard_seconds"] = build_shards(
        manifest, viewed, str(args.workdir / "shards" / code_version()), args.workers)
    val = shard_files.load_split(views_index, "val")
    started_views = time.perf_counter()
    shifted_views = shift_views(manifest, viewed, val, args.workdir / "shift-views" / f"{viewed.digest()[:16]}.npz", args.workers)
    report["shift_views_seconds"] = time.perf_counter() - started_views
    for name in args.recipes:
        chosen = recipe(name)
        parts = {"transform": chosen.transform.model_dump(), "train": chosen.train.model_dump()}
        parts["transform"]["size"] = size
        if args.epochs is not None:
            parts["train"]["epochs"] = args.epochs
        for assignment in args.set:
            key, _, text = assignment.partition("=")
            *path, field = key.split(".")
            target = parts
            for step in path:
                target = target[step]
            if field not in target:
                parser.error(f"--set {assignment}: no setting {key}")
            target[field] = _value(text)
        transform, config = TransformConfig(**parts["transform"]), TrainConfig(**parts["train"])
        # Shards are reused only if written by this very code: their names know the settings, not the code.
        shard_dir = args.workdir / "shards" / code_version()
        index_uri, shard_seconds = build_shards(manifest, transform, str(shard_dir), args.workers)
        data = {split: shard_files.load_split(index_uri, split) for split in ("train", "val", "test")}
        label = args.label or name
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(run_seed(data, config, seed, val, shifted_views))
            for mode, figures in runs[-1].items():
                print(f"{label} {mode} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in figures.items() if k != "seed"), flush=True)
        for mode in ("-views", "+views"):
            report["recipes"][f"{label} {mode}"] = {
                "recipe": name,
                "views": 0 if mode == "-views" else viewed.views.count,
                "overrides": args.set,
                "shard_seconds": shard_seconds,
                "shard_bytes": sum(p.stat().st_size for p in Path(index_uri).parent.glob("*.h5")),
                "rows": {split: len(part.labels) for split, part in data.items()},
                "stress_rows": int(val.stress.shape[0] * val.stress.shape[1]),
                "seeds": [run[mode] for run in runs],
            }
    report["seconds"] = time.perf_counter() - started
    report["load_after"] = os.getloadavg()

    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{report['images']} images of {args.source}, {args.seeds} seeds per recipe, {os.cpu_count()} cores, "
          f"load {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f} (`{command.strip()}`):\n")
    print(table(report))
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
