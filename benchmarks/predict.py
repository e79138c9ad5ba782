"""How fast is prediction, in each of its forms? Prints figures; not a timed test.

(1) API, one process: Predictor.predict images/s against the training transform's
    (featurize with the same config) on the same files; target within 10 %.
(2) Served endpoint: p50 / p99 latency of one POST /predict from a local client, then
    requests/s with 8 concurrent clients (target p50 <= 15 ms).
(3) Batch flow on the 5,840 stand-ins: wall time of `python flows/predict.py`, cold then cached.
(4) CLI start-up: wall time of `pneumo predict one.jpeg`.
(5) Test-time views (issue 24): ms per film of Predictor.predict on the shared 224 px films
    for K = 0, 8, 16 views (decode once, then resample), the distance check included.

Inputs are the realistic ~200 KB full-size JPEGs of benchmarks/synthesize.py, made on first use.

    python benchmarks/predict.py --data /tmp/pneumo-kaggle-5840
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find synthesize.py
import synthesize  # noqa: E402

from pneumo import registry, sizes  # noqa: E402
from pneumo.config import TrainConfig, TransformConfig, seed_train  # noqa: E402
from pneumo.download import build_manifest  # noqa: E402
from pneumo.model import TinyNet  # noqa: E402
from pneumo.predict import Predictor, list_inputs  # noqa: E402
from pneumo.transform import featurize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def register_model(root: str, transform: TransformConfig, reference_rows: "np.ndarray | None" = None) -> None:
    """A schema-2 card with the stand-ins' own p75 transform; the weights do not matter for speed.
    With ``reference_rows``, a reference.json built from them (the distance check's cost)."""
    import hashlib
    import io

    import torch

    torch.manual_seed(0)
    weights = TinyNet(transform.n_features).state_dict()
    buffer = io.BytesIO()
    torch.save(dict(weights), buffer)  # as registry.register writes it
    card = {
        "schema_version": 2,
        "recipe": "seed",
        "threshold": 0.5,
        "labels": {"0": "NORMAL", "1": "PNEUMONIA"},
        "config": {"transform": transform.model_dump(mode="json"), "train": seed_train().model_dump(mode="json")},
        "files": {"model.pt": {"sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "bytes": len(buffer.getvalue())}},
        "metrics": {},
    }
    extra = {}
    if reference_rows is not None:
        from pneumo import reference

        built = reference.build(reference_rows)
        extra = {reference.REFERENCE_NAME: built.to_json()}
        card["ood"] = {"file": reference.REFERENCE_NAME, "cutoff": built.ood_cutoff}
    version = registry.register(root, "tinynet", weights, card, extra_files=extra)
    registry.set_alias(root, "tinynet", "champion", version)


def bench_views(films: Path, recipe_name: str, counts: list[int], n: int, repeats: int) -> None:
    """ms per film of Predictor.predict for each number of views, on ``n`` of the shared 224 px films."""
    from pneumo.config import recipe

    if not (films / "train").is_dir():
        raise SystemExit(f"error: {films} has no train/ folder: give --films (the shared 224 px films)")
    paths = [str(p) for p in sorted((films / "train" / "NORMAL").glob("*.jpeg"))[: n // 2]]
    paths += [str(p) for p in sorted((films / "train" / "PNEUMONIA").glob("*.jpeg"))[: n - len(paths)]]
    transform = recipe(recipe_name).transform.model_copy(update={"size": (224, 224)})
    root = str(Path(tempfile.mkdtemp(prefix="pneumo-bench-views-")) / "registry")
    register_model(root, transform, np.stack([featurize(p, transform) for p in paths]))
    print(f"(5) test-time views, {len(paths)} shared 224 px films, load {os.getloadavg()[0]:.1f}, recipe {recipe_name}, batches of 64, best of {repeats}:")
    for count in counts:
        predictor = Predictor.from_registry(root, views=count)
        predictor.predict(paths[:20])  # warm up
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            for at in range(0, len(paths), 64):
                predictor.predict(paths[at : at + 64])
            best = min(best, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.process_time() - started_cpu)  # less sensitive to the load than wall
        print(f"    K = {count:2d}: {1000 * best / len(paths):6.2f} ms per film wall, {1000 * best_cpu / len(paths):6.2f} ms CPU "
              f"({predictor.runtime})")


def bench_api(paths: list[str], predictor: Predictor, repeats: int) -> None:
    config = predictor.config
    for path in paths[:20]:  # warm the page cache and the allocator
        featurize(path, config)
    best = {"transform": float("inf"), "predict": float("inf")}
    for _ in range(repeats):  # interleaved, best of: the machine is shared
        started = time.perf_counter()
        for path in paths:
            featurize(path, config)
        best["transform"] = min(best["transform"], time.perf_counter() - started)
        started = time.perf_counter()
        for at in range(0, len(paths), 64):
            predictor.predict(paths[at : at + 64])
        best["predict"] = min(best["predict"], time.perf_counter() - started)
    transform_rate, predict_rate = len(paths) / best["transform"], len(paths) / best["predict"]
    print(f"(1) API, one process, {len(paths)} images, best of {repeats}:")
    print(f"    training transform (featurize)  {transform_rate:7.1f} images/s")
    print(f"    Predictor.predict               {predict_rate:7.1f} images/s  ({100 * predict_rate / transform_rate:.0f} % of the transform)")


def bench_server(registry_root: str, image: bytes, requests: int) -> None:
    import httpx

    sys.path.insert(0, str(REPO))
    from tests.helpers import free_port, wait_for_port

    port = free_port()
    command = [str(BIN / "pneumo"), "serve", "--registry", registry_root, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60)
        url = f"http://127.0.0.1:{port}/predict"
        headers = {"content-type": "image/jpeg"}
        with httpx.Client(timeout=30) as client:
            for _ in range(20):
                client.post(url, content=image, headers=headers).raise_for_status()
            latencies = []
            for _ in range(requests):
                started = time.perf_counter()
                client.post(url, content=image, headers=headers).raise_for_status()
                latencies.append(time.perf_counter() - started)
        p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
        print(f"(2) served endpoint, {len(image) / 1000:.0f} KB JPEG, {requests} sequential POST /predict:")
        print(f"    p50 {p50:.1f} ms   p99 {p99:.1f} ms")

        done, failed = [], []

        def client_loop(n: int) -> None:
            with httpx.Client(timeout=60) as own:
                for _ in range(n):
                    response = own.post(url, content=image, headers=headers)
                    (done if response.status_code == 200 else failed).append(1)

        per_client = max(1, requests // 8)
        threads = [threading.Thread(target=client_loop, args=(per_client,)) for _ in range(8)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        print(f"    8 concurrent clients: {len(done) / seconds:.0f} requests/s ({len(done)} ok, {len(failed)} failed)")
    finally:
        server.terminate()
        server.wait(timeout=10)


def bench_flow(data: Path, registry_root: str, workdir: str) -> None:
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-bench-")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(REPO / "flows" / "predict.py"), "--input", str(data), "--registry", registry_root,
               "--workdir", workdir]
    print(f"(3) batch flow on {sum(1 for _ in list_inputs(data))} files (python flows/predict.py, own temporary Prefect server):")
    for what in ("cold", "cached"):
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.perf_counter() - started
        last = [line for line in result.stdout.splitlines() if line.startswith("pneumo:")]
        print(f"    {what:<6} {seconds:6.1f} s wall, {_flow_seconds(result.stdout + result.stderr):6.1f} s in the flow run  "
              f"exit {result.returncode}  {last[-1] if last else result.stderr[-300:]}")


def _flow_seconds(log: str) -> float:
    """From 'Beginning flow run' to the flow run's final state, by the log's timestamps (the
    rest of the wall time is the temporary Prefect server's start and stop)."""
    import re
    from datetime import datetime

    stamps = [
        datetime.strptime(line[:12], "%H:%M:%S.%f")
        for line in log.splitlines()
        if re.match(r"\d\d:\d\d:\d\d\.\d{3} \| INFO    \| Flow run", line)
        and ("Beginning flow run" in line or "Finished in state" in line)
    ]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) >= 2 else float("nan")


def bench_cli(registry_root: str, image: str, repeats: int) -> None:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([str(BIN / "pneumo"), "predict", image, "--registry", registry_root], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    print(f"(4) CLI start-up, `pneumo predict one.jpeg`: median {statistics.median(times):.2f} s, best {min(times):.2f} s of {repeats}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/pneumo-kaggle-5840"), help="the stand-ins (made if missing)")
    parser.add_argument("--images", type=int, default=500, help="images for the API benchmark")
    parser.add_argument("--requests", type=int, default=400, help="requests for the server benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", choices=["seed", "robust", "robust2", "robust3", "robust4"], default="seed",
                        help="the registered model's transform")
    parser.add_argument("--skip", nargs="*", default=[], choices=["api", "server", "flow", "cli", "views"])
    parser.add_argument("--views", type=int, nargs="+", default=[0, 8, 16], help="(5): numbers of test-time views")
    parser.add_argument("--films", type=Path, help="(5): the shared 224 px films",
                        default=Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data" / "chest_xray_224"))
    args = parser.parse_args(argv)

    if "views" not in args.skip:
        bench_views(args.films, "robust4", args.views, args.images, args.repeats)
        if set(args.skip) >= {"api", "server", "flow", "cli"}:
            return 0
    synthesize.ensure(args.data)
    work = Path(tempfile.mkdtemp(prefix="pneumo-bench-predict-"))
    root = str(work / "registry")
    # The transform the pipeline would pick for these files: p75 of their sizes.
    stats = sizes.size_percentiles(build_manifest(args.data), percentiles=(75,))
    from pneumo.config import recipe

    transform = recipe(args.recipe).transform.model_copy(update={"size": sizes.target_size(stats, 75)})
    register_model(root, transform)
    predictor = Predictor.from_registry(root)
    everything = [image.path for image in list_inputs(args.data / "train")]
    paths = everything[:: max(1, len(everything) // args.images)][: args.images]
    print(f"stand-ins {args.data}, recipe {args.recipe} ({transform.method}), transform size {transform.size}, {os.cpu_count()} CPUs (shared machine: figures are noisy)")
    if "api" not in args.skip:
        bench_api(paths, predictor, args.repeats)
    if "server" not in args.skip:
        bench_server(root, Path(paths[0]).read_bytes(), args.requests)
    if "cli" not in args.skip:
        bench_cli(root, paths[0], args.repeats + 2)
    if "flow" not in args.skip:
        bench_flow(args.data, root, str(work / "workdir"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
