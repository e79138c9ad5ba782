"""Peak memory of the shard stage against the number of images: it should stay flat.

For each N it makes a Kaggle-layout folder of N images (hard links to a pool of copies of
the shared 224 x 224 images, each named as its own patient), builds the manifest and plans
the shards (pneumo.shards.plan_shards, as the flow does), saving each shard's spec to a
file. A fresh process then plays one transform worker: it receives the specs one at a
time, as a pool worker receives its tasks, runs pneumo.shards.write_shard on each, and
reports its peak RSS. Small images keep the default run short; the transform's
per-image memory is transient, so image size moves the baseline, not the trend.

    python benchmarks/scale.py --sizes 5000,20000,50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "chest_xray_224"


def make_folder(pool: list[tuple[str, Path]], target: Path, n: int) -> None:
    """N hard links in the Kaggle layout, patient i named IM-i-0001 (one image per patient)."""
    if target.exists():
        shutil.rmtree(target)
    for name in ("NORMAL", "PNEUMONIA"):
        (target / "train" / name).mkdir(parents=True)
    for i in range(n):
        label, source = pool[i % len(pool)]
        os.link(source, target / "train" / label / f"IM-{i:06d}-0001.jpeg")


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec,
    so a child would report its parent's peak (the parent holds the big manifest)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec_dir: str) -> None:
    """The measured process: one worker writing every shard, one spec at a time. Prints JSON."""
    from pneumo import shard_files, shards

    baseline = peak_rss_mb()
    started = time.perf_counter()
    images = n_shards = 0
    for path in sorted(Path(spec_dir).glob("*.json")):
        spec = shard_files.ShardSpec.model_validate_json(path.read_text())
        result = shards.write_shard(spec)
        images += result.count + len(result.quarantine)
        n_shards += 1
    print(json.dumps({
        "images": images,
        "shards": n_shards,
        "seconds": time.perf_counter() - started,
        "rss_after_imports_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/scale.py",
        description="Peak RSS of the shard stage (one worker writing every shard) for growing numbers of images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default="5000,20000,50000", help="comma-separated image counts")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pneumo-scale"), help="scratch folder (rebuilt)")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the images to replicate")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    from pneumo import shards
    from pneumo.config import SplitConfig, seed_transform
    from pneumo.download import build_manifest

    # Hard links need one file system: copy the shared images into the scratch folder once.
    pool_dir = args.workdir / "pool"
    pool = []
    for name in ("NORMAL", "PNEUMONIA"):
        (pool_dir / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((args.shared / "train" / name).glob("*.jpeg")):
            copy = pool_dir / name / path.name
            if not copy.exists():
                shutil.copyfile(path, copy)
            pool.append((name, copy))

    rows = []
    for n in [int(size) for size in args.sizes.split(",")]:
        folder = args.workdir / f"n{n}"
        make_folder(pool, folder, n)
        out = args.workdir / f"shards-n{n}"
        shutil.rmtree(out, ignore_errors=True)
        spec_dir = args.workdir / f"specs-n{n}"
        shutil.rmtree(spec_dir, ignore_errors=True)
        spec_dir.mkdir(parents=True)
        specs = shards.plan_shards(build_manifest(folder), SplitConfig(), seed_transform(), args.shard_size, str(out))
        for i, spec in enumerate(specs):
            (spec_dir / f"{i:05d}.json").write_text(spec.model_dump_json())
        done = subprocess.run([sys.executable, __file__, "--child", str(spec_dir)], check=True, capture_output=True, text=True)
        row = {"n": n, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(
            f"N={n:>7,}  shards {row['shards']:>4}  peak RSS {row['peak_rss_mb']:6.0f} MB "
            f"(after imports {row['rss_after_imports_mb']:.0f} MB)  {row['images'] / row['seconds']:.0f} images/s",
            flush=True,
        )
        for path in (folder, out, spec_dir):
            shutil.rmtree(path)
    print(json.dumps({"shard_size": args.shard_size, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
