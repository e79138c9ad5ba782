"""How often does the drift check cry wolf, and how often does it catch a real change?

On the shared data, carved by patient as the pipeline carves it (pneumo.splits): train a
TinyNet on the train films and their renditions, build the version's reference as
registration does (pneumo.reference.build: the train films' own rows, the val films' scores
and distances), then draw batches from the carved test split:

- same period: test films as they are: ``drift`` should be raised in at most 5 % of the draws;
- the shift suite (pneumo.shift, stored in the test shards: stretches, gamma, bars, blur,
  half resolution, ...): the same films as another machine would show them;
- a change of case mix: the test films drawn with the PNEUMONIA share times 0.7 or 1.3.

Each cell is the share of 100 seeded draws (without replacement within a draw) whose verdict
is ``drift``; per test, the share under DRIFT_ALPHA after the Bonferroni factor. The features
are computed once (the shards, cached under --workdir) and held in memory; the checks then
take a few milliseconds each. Then the speed: the check on 500 films against scoring them
(pneumo.predict on the files).

    python benchmarks/drift.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from pneumo import drift, reference, shard_files, shards, shift
from pneumo.config import SplitConfig, TrainConfig, TransformConfig
from pneumo.download import build_manifest
from pneumo.sizes import size_percentiles, target_size

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data" / "chest_xray_224")
REQUIRED_SHIFTS = ("stretch_x0.82", "stretch_x1.22", "stretch_y0.82", "stretch_y1.22", "gamma_e+0.35", "gamma_e-0.35",
                   "letterbox", "pillarbox", "blur", "lowres_x0.5")
SIZES = (100, 200, 500)


def load_splits(source: Path, workdir: Path, renditions: int) -> tuple[dict[str, shard_files.ShardData], TransformConfig]:
    """Train (with ``renditions`` per film), val and test of the default recipe; shards written once, then reused."""
    manifest = build_manifest(source)
    transform = TransformConfig(size=target_size(size_percentiles(manifest), 75.0), renditions=renditions)
    data = {}
    for split, config in (("train", transform), ("val", transform.model_copy(update={"renditions": 0})),
                          ("test", transform.model_copy(update={"renditions": 0}))):
        # Renditions touch train only; val and test come from the plan without them, which other runs share.
        specs = [s for s in shards.plan_shards(manifest, SplitConfig(), config, 1000, str(workdir)) if s.split == split]
        results = [shards.write_shard(spec) for spec in specs]
        parts = [shard_files.read_shard(r.uri, r.sha256) for r in results]
        data[split] = shard_files.ShardData(
            features=np.concatenate([p.features for p in parts]), labels=np.concatenate([p.labels for p in parts]),
            relpaths=[r for p in parts for r in p.relpaths], patient_ids=[i for p in parts for i in p.patient_ids],
            renditions=np.concatenate([p.renditions for p in parts]),
            shift={name: np.concatenate([p.shift[name] for p in parts]) for name in (parts[0].shift or {})},
            borders=None if parts[0].borders is None else np.concatenate([p.borders for p in parts]),
            shift_borders={name: np.concatenate([p.shift_borders[name] for p in parts]) for name in parts[0].shift_borders},
        )
    return data, transform


def draw(rng: np.random.Generator, labels: np.ndarray, n: int, share: float | None) -> np.ndarray:
    """``n`` row numbers without replacement; with ``share``, that share of them PNEUMONIA."""
    if share is None:
        return rng.choice(len(labels), n, replace=False)
    k = int(round(n * share))
    return np.concatenate([rng.choice(np.flatnonzero(labels == 1), k, replace=False),
                           rng.choice(np.flatnonzero(labels == 0), n - k, replace=False)])


def possible(labels: np.ndarray, n: int, share: float) -> bool:
    """Whether the split holds enough films of each class for a batch of ``n`` at ``share`` PNEUMONIA."""
    k = int(round(n * share))
    return k <= (labels == 1).sum() and n - k <= (labels == 0).sum()


def rates(ref, features: np.ndarray, scores: np.ndarray, labels: np.ndarray, n: int, draws: int, name: str,
          share: float | None = None, borders: np.ndarray | None = None) -> dict:
    """Share of ``draws`` seeded batches of ``n`` with verdict drift (and warn or worse), and each test's share."""
    verdicts, fired = [], {test: 0 for test in drift.TESTS}
    for seed in range(draws):
        rng = np.random.default_rng([seed, n, zlib.crc32(name.encode())])
        rows = draw(rng, labels, n, share)
        report = drift.check(ref, features[rows], scores[rows], borders=None if borders is None else borders[rows])
        verdicts.append(report.verdict)
        if report.verdict == "drift":
            for test in report.fired:
                fired[test] += 1
    return {"drift": verdicts.count("drift") / draws, "warn_or_drift": (draws - verdicts.count("none")) / draws,
            "by_test": {test: count / draws for test, count in fired.items()}}


def speed(ref, state_dict, transform: TransformConfig, source: Path, relpaths: list[str], features: np.ndarray,
          borders: np.ndarray | None = None) -> dict:
    """Seconds to score the films from their files (pneumo.predict) and to check them, on one process."""
    from pneumo.predict import Predictor

    card = {"schema_version": 2, "threshold": 0.5, "config": {"transform": transform.model_dump(mode="json")}}
    predictor = Predictor(state_dict, card, model_name="bench", version="v0001")
    paths = [str(source / relpath) for relpath in relpaths]
    predictor.predict(paths[:5])  # imports and first-call costs out of the way
    started = time.perf_counter()
    predictions = predictor.predict(paths)
    scoring = time.perf_counter() - started
    scores = np.array([p.probability for p in predictions])
    drift.check(ref, features[:100], scores[:100])  # scipy's import out of the way
    started = time.perf_counter()
    report = drift.check(ref, features, scores, borders=borders)
    checking = time.perf_counter() - started
    from pneumo import plots  # the artifact's picture: matplotlib's import (once per process), then the drawing

    drawing = time.perf_counter()
    plots.drift_picture(report.feature_ks, transform.grid, ref.score_quantiles, scores)
    drawing = time.perf_counter() - drawing
    return {"films": len(paths), "views": transform.views.count, "scoring_seconds": round(scoring, 3),
            "check_seconds": round(checking, 4), "check_share_of_scoring": round(checking / scoring, 4),
            "picture_seconds": round(drawing, 3), "check_and_picture_share": round((checking + drawing) / scoring, 4)}


def table(results: dict) -> str:
    lines = ["| batch | " + " | ".join(f"drift at {n} films" for n in SIZES) + " | tests firing at 200 |",
             "|---|" + "---:|" * len(SIZES) + "---|"]
    for name, by_size in results.items():
        cells = [f"{by_size[n]['drift']:.0%}" if n in by_size else "" for n in SIZES]
        at = by_size.get(200) or next(iter(by_size.values()))
        firing = ", ".join(f"{t} {v:.0%}" for t, v in at["by_test"].items() if v) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {firing} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/drift.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", type=Path, default=SHARED_DATA, help="a folder in the Kaggle layout")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-drift/shards"), help="where the shards go (reused)")
    parser.add_argument("--renditions", type=int, default=12, help="renditions per train film (the reference's rows)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--draws", type=int, default=100, help="seeded batches per cell")
    parser.add_argument("--all-shifts", action="store_true", help="every shift of the suite, not only the issue's")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not (args.source / "train").is_dir():
        print(f"error: {args.source} has no train/ folder (see ../shared/data/chest_xray_224/README.md)", file=sys.stderr)
        return 2
    from pneumo.model import predict_proba
    from pneumo.train import train

    started = time.perf_counter()
    data, transform = load_splits(args.source, args.workdir, args.renditions)
    tr, val, test = data["train"], data["val"], data["test"]
    result = train(tr.features, tr.labels, val.features, val.labels, TrainConfig(epochs=args.epochs))
    films = tr.originals()
    ref = reference.build(films.features, predict_proba(result.state_dict, val.features),  # as registration
                          grid=transform.grid, slope_part=transform.pooling.index("mean"), val_features=val.features,
                          train_borders=films.borders)
    print(f"data and model ready in {time.perf_counter() - started:.0f} s: {int((tr.renditions == 0).sum())} train films "
          f"({len(tr.labels)} rows), {len(val.labels)} val, {len(test.labels)} test; reference "
          f"{len(ref.to_json()) / 1000:.1f} kB", file=sys.stderr)

    probs = {"clean": predict_proba(result.state_dict, test.features)}
    share = float(test.labels.mean())
    results: dict = {"same period": {n: rates(ref, test.features, probs["clean"], test.labels, n, args.draws, "same",
                                               borders=test.borders) for n in SIZES}}
    for factor in (0.7, 1.3):
        name = f"PNEUMONIA share x{factor} ({share:.2f} -> {share * factor:.2f})"
        results[name] = {n: rates(ref, test.features, probs["clean"], test.labels, n, args.draws, name, share * factor,
                                  borders=test.borders) for n in SIZES if possible(test.labels, n, share * factor)}
    for name in shift.NAMES if args.all_shifts else REQUIRED_SHIFTS:
        scores = predict_proba(result.state_dict, test.shift[name])
        results[name] = {n: rates(ref, test.shift[name], scores, test.labels, n, args.draws, name,
                                  borders=test.shift_borders.get(name)) for n in SIZES}
    figures = {"results": results, "speed": speed(ref, result.state_dict, transform, args.source, test.relpaths[:500],
                                                  test.features[:500], None if test.borders is None else test.borders[:500]),
               "draws": args.draws, "reference_kb": len(ref.to_json()) / 1000, "load": os.getloadavg()}
    print(table(results))
    print(json.dumps(figures["speed"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
