"""How long does training take? Prints the training step's wall and CPU seconds; not a timed test.

Trains TinyNet on the train and val rows of an existing shard index (``pneumo run`` writes one under
its workdir's shards/) with a recipe's train config, exactly as the run's training step does
(pneumo.train.train), and prints wall seconds, CPU seconds of the process (user + sys: less sensitive
to the machine's load than wall) and the load average. Issue 24's bound: the default recipe within
60 s CPU on the shared data at load ~1.

    python benchmarks/train.py --index WORKDIR/shards/.../index.json --recipe robust4
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from pneumo import shard_files, train
from pneumo.config import recipe


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="a shard index.json of the recipe's transform")
    parser.add_argument("--recipe", default="robust4")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    config = recipe(args.recipe).train
    data = {split: shard_files.load_split(args.index, split) for split in ("train", "val")}
    print(f"recipe {args.recipe}: {len(data['train'].labels)} train rows, {config.epochs} epochs, batch {config.batch_size}")
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = train.train(data["train"].features, data["train"].labels, data["val"].features, data["val"].labels, config)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        print(f"    {wall:6.1f} s wall, {cpu:6.1f} s CPU (user + sys), load {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end; best epoch {result.best_epoch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
