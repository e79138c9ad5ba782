"""How often does the out-of-distribution check flag real films? Prints figures; not a timed test.

Builds the reference a version would store (pneumo.reference: the train split's films' own rows,
with the slope check) from a shard index of the shared data, then reports the cut-offs and the
share of the shared films flagged: each film's own row (train, val, test), all 5,216 films. Issue
24 wants at most 1 in 100. Then the pictures of issue 23 item 9 (tests/model/test_ood.py), through
a Predictor with that reference.

    python benchmarks/quality.py ...   # writes the robust4 shards of the shared data
    python benchmarks/ood.py --index /tmp/pneumo-quality-robust4/shards/<code>/<digest>/index.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pneumo import reference, shard_files
from pneumo.config import TransformConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/ood.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index.json of shards of the shared data")
    args = parser.parse_args(argv)
    data = {split: shard_files.load_split(str(args.index), split) for split in ("train", "val", "test")}
    transform = TransformConfig.stored(shard_files.read_index(str(args.index))["transform"])
    started = time.perf_counter()
    ref = reference.build(data["train"].originals().features, grid=transform.grid,
                          slope_part=transform.pooling.index("mean") if "mean" in transform.pooling else 0)
    seconds = time.perf_counter() - started
    print(f"reference of {ref.n_rows} training rows in {seconds:.1f} s, {len(ref.to_json()) / 1000:.1f} KB; "
          f"cut-off {ref.ood_cutoff:.2f} (the {ref.cutoff_quantile}th percentile of their distances), "
          f"slope cut-off {ref.slope_cutoff}")
    total = flagged = 0
    for split, part in data.items():
        own = part.originals().features
        found = reference.distances(ref, own)
        over = sum(reference.warning(ref, row) is not None for row in own)
        total, flagged = total + len(own), flagged + over
        print(f"  {split:<5} {len(own):5d} films: {over:3d} flagged ({100 * over / len(own):.2f} %), "
              f"distance p50 {np.median(found):.1f}, p99 {np.percentile(found, 99):.1f}, max {found.max():.1f}")
    print(f"all   {total:5d} films: {flagged:3d} flagged ({100 * flagged / total:.2f} %)")
    not_films(ref, transform)
    return 0


def not_films(ref: reference.Reference, transform: TransformConfig) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pneumo.model import TinyNet
    from pneumo.predict import Predictor
    from tests.model.test_ood import NOT_FILMS

    card = {"schema_version": 2, "threshold": 0.5, "config": {"transform": transform.model_dump(mode="json")}}
    weights = {k: v.clone() for k, v in TinyNet(transform.n_features).state_dict().items()}  # the check needs no training
    predictor = Predictor(weights, card, model_name="tinynet", version="v0001", reference=ref, views=0)
    for name, make in NOT_FILMS.items():
        (p,) = predictor.predict([(name, make())])
        slope = reference.slopes(ref, predictor.features(make())[0])[0] if ref.grid else float("nan")
        flagged = any(w.startswith("out of distribution") for w in p.warnings)
        print(f"  {name:<26} distance {p.distance:5.1f}  slope R^2 {slope:4.2f}  {'flagged' if flagged else 'NOT flagged'}")


if __name__ == "__main__":
    sys.exit(main())
