"""How long does a fully cached re-run take, beside `python -c "import prefect"`? Prints figures; not a timed test.

Target (issue 17): a cached re-run of `python flows/full.py` takes at most 5 x `import prefect`
measured beside it. Uses the local Prefect server (flows/prefect_server.py) unless PREFECT_API_URL
is set; the first run fills the cache (and starts the server if none is up) and is not counted.
Each round times `import prefect`, then the re-run, with the load average beside them.

    python benchmarks/cached_rerun.py --source ../shared/data/chest_xray_224 --workdir /tmp/pneumo-bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = [sys.executable, "flows/full.py", "--source", args.source, "--workdir", args.workdir]
    print(f"filling the cache: {timed(run):.1f} s", flush=True)
    ratios = []
    for number in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        prefect = timed([sys.executable, "-c", "import prefect"])
        rerun = timed(run)
        ratios.append(rerun / prefect)
        print(f"round {number}: load {load:.1f}  import prefect {prefect:.1f} s  cached re-run {rerun:.1f} s  "
              f"ratio {rerun / prefect:.1f} (target <= 5)", flush=True)
    print(f"median ratio {sorted(ratios)[len(ratios) // 2]:.1f}")


if __name__ == "__main__":
    main()
