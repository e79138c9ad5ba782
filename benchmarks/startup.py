"""`pneumo predict one.jpeg` beside `python -c "import torch"`: the one-image start-up.

    python benchmarks/startup.py --repeats 7 [--registry REG] [--image X.jpeg]

Runs the two commands alternately (so that load changes hit both alike), prints every
time, the medians, their ratio (target: predict at most half of import torch), the
runtime the command used (onnxruntime when the version has model.onnx) and the load
average before and after. Without ``--registry`` a version with random weights is
registered in a temporary folder (registration writes model.onnx, as the pipeline does).
"""

from __future__ import annotations

from pneumo.config import seed_train
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SHARED = Path(os.environ.get("PNEUMO_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray_224")


def temporary_registry() -> str:
    from pneumo import registry
    from pneumo.model import TinyNet
    from pneumo.config import TrainConfig, recipe
    from pneumo import reference
    from pneumo.recipes import DEFAULT_RECIPE
    from pneumo.transform import featurize

    root = tempfile.mkdtemp(prefix="pneumo-bench-startup-")
    # The default recipe's transform (robust4: 16 test-time views) and a reference.json, as a run registers them.
    transform = recipe(DEFAULT_RECIPE).transform.model_copy(update={"size": (224, 224)})
    card = {
        "schema_version": 2, "recipe": DEFAULT_RECIPE, "threshold": 0.5, "labels": {"0": "NORMAL", "1": "PNEUMONIA"},
        "config": {"transform": transform.model_dump(mode="json"), "train": seed_train().model_dump(mode="json")},
        "metrics": {},
    }
    films = sorted((SHARED / "train" / "NORMAL").glob("*.jpeg"))[:150] + sorted((SHARED / "train" / "PNEUMONIA").glob("*.jpeg"))[:150]
    built = reference.build(__import__("numpy").stack([featurize(f, transform) for f in films]))
    version = registry.register(root, "tinynet", TinyNet(transform.n_features).state_dict(), card,
                                extra_files={reference.REFERENCE_NAME: built.to_json()})
    registry.set_alias(root, "tinynet", "champion", version)
    return root


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/startup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", help="a registry with a champion [default: a temporary one]")
    parser.add_argument("--image", default=str(SHARED / "train" / "NORMAL" / "IM-0115-0001.jpeg"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    registry = args.registry or temporary_registry()
    predict = [str(BIN / "pneumo"), "predict", args.image, "--registry", registry]
    torch = [sys.executable, "-c", "import torch"]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    times: dict[str, list[float]] = {"pneumo predict one.jpeg": [], "python -c 'import torch'": []}
    last = ""
    for _ in range(args.repeats):
        seconds, last = timed(predict)
        times["pneumo predict one.jpeg"].append(seconds)
        times["python -c 'import torch'"].append(timed(torch)[0])
    for name, values in times.items():
        print(f"{name:<26} median {statistics.median(values):5.2f} s   runs {' '.join(f'{v:.2f}' for v in values)}")
    ratio = statistics.median(times["pneumo predict one.jpeg"]) / statistics.median(times["python -c 'import torch'"])
    print(f"ratio predict / import torch: {ratio:.2f} (target <= 0.50)")
    print(f"last predict said: {last.strip().splitlines()[-1]}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
