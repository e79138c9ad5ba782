"""How often does the out-of-distribution check flag real films? Prints figures; not a timed test.

Builds the reference a version would store (pneumo.reference: the train split's rows, renditions
included) from a shard index of the shared data, then reports the cut-off and the share of the
shared films flagged: each film's own row (train originals, val, test), all 5,216 films. Issue 24
wants at most 1 in 100.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/ood.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index.json of shards of the shared data")
    args = parser.parse_args(argv)
    data = {split: shard_files.load_split(str(args.index), split) for split in ("train", "val", "test")}
    started = time.perf_counter()
    ref = reference.build(data["train"].features)
    seconds = time.perf_counter() - started
    print(f"reference of {ref.n_rows} training rows in {seconds:.1f} s, {len(ref.to_json()) / 1000:.1f} KB; "
          f"cut-off {ref.ood_cutoff:.2f} (the {ref.cutoff_quantile}th percentile of their distances)")
    total = flagged = 0
    for split, part in data.items():
        own = part.originals().features
        found = reference.distances(ref, own)
        over = int((found > ref.ood_cutoff).sum())
        total, flagged = total + len(own), flagged + over
        print(f"  {split:<5} {len(own):5d} films: {over:3d} flagged ({100 * over / len(own):.2f} %), "
              f"distance p50 {np.median(found):.1f}, p99 {np.percentile(found, 99):.1f}, max {found.max():.1f}")
    print(f"all   {total:5d} films: {flagged:3d} flagged ({100 * flagged / total:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
