"""How fast is the transform, and how faithful? One run, the same files, three ways.

(a) seed:  the seed's recipe done the straightforward way with Pillow: full decode to three
           channels (the seed read with cv2.imread), their mean as one float gray layer
           (np.mean(img, 2)), float resize to 1000 x 1300, crop 10 % per border, max-pool.
(b) pneumo: pneumo.transform.featurize as the pipeline runs it (method "fast").
(c) floor: Pillow decoding the same files with draft at 1/8 scale and nothing else.

Each is timed on one process and on all cores (a process pool). A fourth section times the
default recipe's train-image work with K augmented renditions against K = 0 (bound: at most
2.5x, issue 16; the default recipe's K is chosen with it). Fidelity compares (b) with
the exact full-resolution recipe (method "exact"): per-image Pearson r over the whole data
set, and the validation AUC of TinyNet trained on either set of features over the same
patient-grouped split. Inputs are realistic full-size JPEGs made by benchmarks/synthesize.py.

    python benchmarks/transform.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find synthesize.py
import synthesize  # noqa: E402

from pneumo import augment  # noqa: E402
from pneumo.config import SplitConfig, TrainConfig, TransformConfig  # noqa: E402
from pneumo.recipes import DEFAULT_RECIPE  # noqa: E402
from pneumo.config import recipe, seed_train, seed_transform  # noqa: E402
from pneumo.transform import crop_box, featurize, max_pool  # noqa: E402

SEED_CONFIG = seed_transform()  # the seed's 1000 x 1300, 10 % crop, 10 x 14 grid


def seed_straightforward(path: str) -> np.ndarray:
    """(a): the seed's recipe, ported to Pillow without tricks."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    gray = pixels.mean(axis=2) / 255.0
    height, width = SEED_CONFIG.size
    resized = np.asarray(Image.fromarray(gray.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
    left, top, right, bottom = crop_box(height, width, SEED_CONFIG.crop_fraction)
    return max_pool(resized[top:bottom, left:right], SEED_CONFIG.grid).ravel()


def pneumo_fast(path: str) -> np.ndarray:
    """(b)."""
    return featurize(path, seed_transform(method="fast"))


def pneumo_exact(path: str) -> np.ndarray:
    return featurize(path, seed_transform(method="exact"))


def decode_floor(path: str) -> None:
    """(c): decode at 1/8 scale in the file's own mode, nothing else."""
    with Image.open(path) as image:
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()


METHODS = {"a_seed": seed_straightforward, "b_pneumo": pneumo_fast, "c_floor": decode_floor}


def _run_all(fn_name: str, paths: list[str]) -> list:
    fn = {**METHODS, "exact": pneumo_exact}[fn_name]
    return [fn(path) for path in paths]


def _chunks(paths: list[str], size: int) -> list[list[str]]:
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def time_methods(paths: list[str], repeats: int, pool: ProcessPoolExecutor | None = None, workers: int = 1) -> dict[str, float]:
    """Images per second of each method, best of ``repeats`` passes.

    The methods take turns within each pass, so a noisy neighbour on a shared machine slows
    all three alike instead of one of them.
    """
    chunks = _chunks(paths, max(1, len(paths) // (4 * workers)))
    best = {name: float("inf") for name in METHODS}
    for _ in range(repeats):
        for name in METHODS:
            if pool is None:
                seconds = _seconds(lambda: _run_all(name, paths))
            else:
                seconds = _seconds(lambda: list(pool.map(_run_all, [name] * len(chunks), chunks)))
            best[name] = min(best[name], seconds)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def features_in_pool(pool: ProcessPoolExecutor, name: str, paths: list[str]) -> np.ndarray:
    rows = []
    for part in pool.map(_run_all, [name] * len(_chunks(paths, 64)), _chunks(paths, 64)):
        rows.extend(part)
    return np.stack(rows)


def val_auc(features: np.ndarray, index: dict[str, int], by_split: dict, config: TrainConfig) -> dict:
    """Train TinyNet on the train split, early-stop on val; AUC of the best epoch on val and test."""
    from pneumo.evaluate import metrics
    from pneumo.model import predict_proba
    from pneumo.train import train

    data = {}
    for split, records in by_split.items():
        rows = [index[r.relpath] for r in records]
        data[split] = (features[rows], np.array([r.label for r in records], np.float32))
    result = train(*data["train"], *data["val"], config)
    out = {"best_epoch": result.best_epoch, "epochs_run": len(result.history)}
    for split in ("val", "test"):
        out[f"{split}_auc"] = metrics(data[split][1], predict_proba(result.state_dict, data[split][0]))["roc_auc"]
    return out


def fidelity(pool: ProcessPoolExecutor, data: Path, train_config: TrainConfig | None) -> dict:
    """(b) against the exact recipe on every image of ``data``: per-image r, and model AUCs."""
    from pneumo.download import build_manifest
    from pneumo.splits import records_by_split

    manifest = build_manifest(data)
    paths = [str(data / r.relpath) for r in manifest.records]
    fast = features_in_pool(pool, "b_pneumo", paths)
    exact = features_in_pool(pool, "exact", paths)
    r = np.array([np.corrcoef(f, e)[0, 1] for f, e in zip(fast, exact)])
    out = {
        "images": len(paths),
        "pearson_r": {"min": float(r.min()), "p1": float(np.percentile(r, 1)), "median": float(np.median(r)),
                      "share_at_least_0.99": float((r >= 0.99).mean())},
    }
    if train_config is not None:
        by_split = records_by_split(manifest, SplitConfig())
        index = {record.relpath: i for i, record in enumerate(manifest.records)}
        out["split_sizes"] = {split: len(records) for split, records in by_split.items()}
        out["train_config"] = train_config.model_dump()
        out["model_fast"] = val_auc(fast, index, by_split, train_config)
        out["model_exact"] = val_auc(exact, index, by_split, train_config)
        out["val_auc_difference"] = abs(out["model_fast"]["val_auc"] - out["model_exact"]["val_auc"])
    return out


def renditions_rows(path: str, config: TransformConfig, renditions: int) -> np.ndarray:
    """What write_shard computes for one train image: one decode, then the original and K renditions."""
    from pneumo.images import decode_gray

    gray = decode_gray(path, config)
    return augment.rendition_features(gray, config, "0" * 64, renditions)


def time_renditions(paths: list[str], repeats: int, renditions: int) -> dict[str, float]:
    """Images per second of the default recipe's train-image work with K = 0 and K = ``renditions``, one process.

    Both decode once per image (K = 0 is exactly what the 'resample' method costs); K and 0
    take turns within each pass, and the best pass counts.
    """
    config = recipe(DEFAULT_RECIPE).transform
    best = {0: float("inf"), renditions: float("inf")}
    for _ in range(repeats):
        for k in best:
            best[k] = min(best[k], _seconds(lambda: [renditions_rows(p, config, k) for p in paths]))
    return {
        "recipe": DEFAULT_RECIPE,
        "k": renditions,
        "k0_images_per_s": len(paths) / best[0],
        "k_images_per_s": len(paths) / best[renditions],
        "cost_ratio": best[renditions] / best[0],
    }


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory (ru_maxrss is in KiB on Linux) of this process and of its largest worker."""
    return {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def summary(report: dict) -> str:
    s = report["speed"]
    lines = [
        f"transform benchmark: {s['images']} JPEGs, mean {s['mean_kb']:.0f} KB, mean {s['mean_size'][0]:.0f} x "
        f"{s['mean_size'][1]:.0f} px (w x h), {s['rgb_share']:.0%} RGB; {report['cpu_count']} cores",
        f"{'':24}{'1 process':>12}{str(s['workers']) + ' processes':>14}{'scaling':>9}",
    ]
    labels = {"a_seed": "(a) seed, Pillow", "b_pneumo": "(b) pneumo fast", "c_floor": "(c) decode floor 1/8"}
    for key, label in labels.items():
        one, many = s["one_process"][key], s["all_cores"][key]
        lines.append(f"  {label:<22}{one:>8.0f} im/s{many:>9.0f} im/s{many / one:>8.2f}x")
    lines.append(
        f"  b/a {s['b_over_a']:.1f}x faster on one core (target >= 8)   "
        f"c/b {s['c_over_b']:.2f} (target <= 1.25; < 1 beats the floor)"
    )
    rendered = report.get("renditions")
    if rendered:
        lines.append(
            f"  renditions ({rendered['recipe']} recipe, 1 process): K=0 {rendered['k0_images_per_s']:.0f} im/s, "
            f"K={rendered['k']} {rendered['k_images_per_s']:.0f} im/s: cost x{rendered['cost_ratio']:.2f} (target <= 2.5)"
        )
    lines.append(f"  peak RSS: main {report['peak_rss_mb']['main']:.0f} MB, largest worker {report['peak_rss_mb']['largest_worker']:.0f} MB")
    f = report.get("fidelity")
    if f:
        r = f["pearson_r"]
        lines.append(
            f"fidelity on {f['images']} images, (b) vs exact: per-image r min {r['min']:.4f}, 1st pct {r['p1']:.4f}, "
            f"median {r['median']:.4f}; {r['share_at_least_0.99']:.1%} >= 0.99"
        )
        if "model_fast" in f:
            mf, me = f["model_fast"], f["model_exact"]
            lines.append(
                f"  TinyNet val AUC: fast {mf['val_auc']:.4f} (epoch {mf['best_epoch']}), exact {me['val_auc']:.4f} "
                f"(epoch {me['best_epoch']}); difference {f['val_auc_difference']:.4f} (target <= 0.01)"
            )
            lines.append(f"  test AUC: fast {mf['test_auc']:.4f}, exact {me['test_auc']:.4f}; splits {f['split_sizes']}")
    lines.append(f"took {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/transform.py",
        description="Benchmark (a) the seed's recipe done straightforwardly, (b) pneumo's transform and "
        "(c) the 1/8-scale JPEG decode floor on realistic full-size X-ray JPEGs, on one process and on all "
        "cores, and measure (b)'s fidelity to the exact recipe. Prints a summary, then the figures as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/pneumo-kaggle-5840"),
                        help="Kaggle-layout folder of realistic JPEGs; made with benchmarks/synthesize.py if missing")
    parser.add_argument("--images", type=int, default=400, help="files timed (spread evenly over --data)")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes per measurement; the best counts")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for the all-cores figures")
    parser.add_argument("--fidelity", choices=["full", "r-only", "none"], default="full",
                        help="full: per-image r over all of --data plus TinyNet val AUC on fast vs exact features")
    parser.add_argument("--epochs", type=int, default=seed_train().epochs, help="max training epochs for the AUC check")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--renditions", type=int, default=recipe(DEFAULT_RECIPE).transform.renditions,
                        help="K for the renditions section (0 skips it); default: the default recipe's K")
    parser.add_argument("--only-renditions", action="store_true", help="time only the renditions section")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    synthesize.ensure(args.data, args.workers)
    every = sorted(str(p) for p in args.data.glob("*/*/*.jpeg"))
    paths = every[:: max(1, len(every) // args.images)][: args.images]
    for path in paths:  # warm the page cache: time decoding, not the disk
        Path(path).read_bytes()
    sizes, modes = [], []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
            modes.append(image.mode)

    speed = {
        "images": len(paths),
        "mean_kb": float(np.mean([os.path.getsize(p) for p in paths]) / 1000),
        "mean_size": np.mean(sizes, axis=0).tolist(),
        "rgb_share": modes.count("RGB") / len(modes),
        "workers": args.workers,
    }
    if args.only_renditions:
        report = {"cpu_count": os.cpu_count(), "data": str(args.data), "speed": speed}
        report["renditions"] = time_renditions(paths, args.repeats, args.renditions)
        r = report["renditions"]
        print(
            f"renditions on {len(paths)} JPEGs ({r['recipe']} recipe, 1 process): K=0 {r['k0_images_per_s']:.0f} im/s, "
            f"K={r['k']} {r['k_images_per_s']:.0f} im/s: cost x{r['cost_ratio']:.2f} (target <= 2.5)"
        )
        print(json.dumps(report))
        return 0
    for name in METHODS:
        _run_all(name, paths[:5])  # warm up imports and caches
    speed["one_process"] = time_methods(paths, args.repeats)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(_run_all, ["b_pneumo"] * args.workers, [paths[:5]] * args.workers))  # start the workers
        speed["all_cores"] = time_methods(paths, args.repeats, pool, args.workers)
        speed["b_over_a"] = speed["one_process"]["b_pneumo"] / speed["one_process"]["a_seed"]
        speed["c_over_b"] = speed["one_process"]["c_floor"] / speed["one_process"]["b_pneumo"]
        speed["b_scaling"] = speed["all_cores"]["b_pneumo"] / speed["one_process"]["b_pneumo"]
        report = {"cpu_count": os.cpu_count(), "data": str(args.data), "speed": speed}
        if args.fidelity != "none":
            config = seed_train(epochs=args.epochs) if args.fidelity == "full" else None
            report["fidelity"] = fidelity(pool, args.data, config)
    if args.renditions:
        report["renditions"] = time_renditions(paths, args.repeats, args.renditions)
    report["peak_rss_mb"] = peak_rss_mb()
    report["seconds"] = time.perf_counter() - started

    print(summary(report))
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
