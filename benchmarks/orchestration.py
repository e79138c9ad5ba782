"""Prefect's overhead on the transform stage: the flow's shard stage against a bare process pool.

For each shard size, the same shard specs are written three times into fresh folders: once by
``concurrent.futures.ProcessPoolExecutor`` calling pneumo.shards.write_shard (no Prefect),
once by the library's whole stage, ``pneumo.shards.run`` with a process pool (planning,
verifying, the index; no Prefect), and once by the flow's ``shard_stage`` with ``--runner
processes``, timed inside a flow run as the pipeline runs it (the library's steps plus one
task run per shard with cache lookup and result persistence, logging, the index task, one
local Prefect server). Overhead = (flow - bare) / flow; Prefect's own share = (flow - library) / flow.

The pipeline starts the transform pool's forkserver while stages 1 and 2 run; here it is
started once before timing, and the time it took is printed.

    python benchmarks/orchestration.py --data /tmp/pneumo-kaggle-5840
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # flows/ is a folder of the repository, not of the installed package path
sys.path.insert(0, str(REPO / "benchmarks"))  # synthesize.py

from prefect import flow  # noqa: E402

from cli.runtime import prefect_api  # noqa: E402
from flows.full import write_shards  # noqa: E402
from tasks.shards import write_index  # noqa: E402
from pneumo import pool, shards, shard_files  # noqa: E402
from pneumo.config import RunConfig, SplitConfig, TransformConfig, seed_transform  # noqa: E402
from pneumo.download import build_manifest  # noqa: E402
from pneumo.manifest import save_manifest  # noqa: E402
import synthesize  # noqa: E402


def plan(manifest, shard_size: int, out: Path) -> list[shard_files.ShardSpec]:
    shutil.rmtree(out, ignore_errors=True)
    return shards.plan_shards(manifest, SplitConfig(), seed_transform(), shard_size, str(out))


@flow(name="pneumo-orchestration-benchmark")
def timed_shard_stage(manifest_uri: str, root: str, shard_size: int, workdir: str, workers: int) -> float:
    """Seconds the shard stage takes inside a flow run, as in the pipeline."""
    started = time.perf_counter()
    config = RunConfig(run={"retries": 0, "runner": "processes", "workers": workers, "shard_size": shard_size},
                       transform=seed_transform(), split=SplitConfig())
    plan = shards.plan(manifest_uri, root, config.split, config.transform, shard_size, workdir)
    write_index(plan, write_shards(plan.specs, config, workdir))  # stage 3 as the flow runs it
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/orchestration.py",
        description="Wall time of the flow's shard stage (Prefect, process pool) against a bare process pool "
        "and the library's stage without Prefect (pneumo.shards.run) doing the same shards, per shard size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/pneumo-kaggle-5840"), help="Kaggle-layout folder of realistic JPEGs; made with benchmarks/synthesize.py if missing")
    parser.add_argument("--shard-sizes", default="500,1000,2000", help="comma-separated images per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes in every run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts (shared machines are noisy)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-orchestration"), help="scratch folder")
    args = parser.parse_args(argv)

    synthesize.ensure(args.data, args.workers)
    manifest = build_manifest(args.data)
    manifest_uri = save_manifest(manifest, str(args.workdir / "manifests"))
    for path in manifest.records:  # warm the page cache so both runs read from memory
        (Path(manifest.root) / path.relpath).read_bytes()

    started = time.perf_counter()
    with pool.ProcessPool(args.workers) as warm:  # the forkserver, as the pipeline starts it in stage 1
        warm.run(os.getpid)
    warm_up_s = time.perf_counter() - started
    print(f"transform pool warm-up (hidden behind stages 1-2 in the pipeline): {warm_up_s:.1f} s", flush=True)

    rows = []
    with prefect_api():
        for shard_size in [int(s) for s in args.shard_sizes.split(",")]:
            bare = library = in_flow = float("inf")
            for _ in range(args.repeats):
                specs = plan(manifest, shard_size, args.workdir / "bare")
                started = time.perf_counter()
                with ProcessPoolExecutor(max_workers=args.workers) as executor:
                    list(executor.map(shards.write_shard, specs))
                bare = min(bare, time.perf_counter() - started)

                started = time.perf_counter()
                shards.run(manifest_uri, manifest.root, SplitConfig(), seed_transform(), shard_size,
                             str(args.workdir / f"library-{time.time_ns()}"), workers=args.workers)
                library = min(library, time.perf_counter() - started)

                # A fresh workdir each time: new shard URIs, so no cache hit.
                workdir = args.workdir / f"flow-{time.time_ns()}"
                in_flow = min(in_flow, timed_shard_stage(manifest_uri, manifest.root, shard_size, str(workdir), args.workers))

            row = {"shard_size": shard_size, "shards": len(specs), "bare_s": bare, "library_s": library,
                   "flow_s": in_flow, "overhead": (in_flow - bare) / in_flow,
                   "prefect_overhead": (in_flow - library) / in_flow}
            rows.append(row)
            print(f"shard size {shard_size:>5}: {len(specs):>3} shards  bare pool {bare:6.2f} s  "
                  f"library {library:6.2f} s  flow {in_flow:6.2f} s  overhead {row['overhead']:.0%} "
                  f"(Prefect's own {row['prefect_overhead']:.0%})", flush=True)
    print(json.dumps({"images": len(manifest.records), "workers": args.workers, "warm_up_s": warm_up_s, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
