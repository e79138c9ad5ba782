"""Faults: kill -9 and re-run, transient S3 errors, corrupted shards, concurrent registration."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL

from tests.helpers import ROBUST3, full_flow as full  # flat settings; the run's own go into its run section
from pneumo import shard_files, shards, storage
from pneumo.config import SplitConfig, TrainConfig, TransformConfig, seed_train, seed_transform
from pneumo.download import build_manifest
from pneumo.manifest import save_manifest
from tasks.shards import write_shard
from tests.faults.s3_fault_proxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
# robust3, not the default robust4: a quarter of the rows per epoch (12 renditions, not 48), and no
# test-time views to featurize; nothing here depends on the recipe.
QUICK = ["--run.shard-size", "40", "--run.runner", "threads", "--run.workers", "1", "--recipe", "robust3"]
# Training logs every 50th epoch: 120 epochs give the train-stage kill its "epoch 50/" line to wait for.
KILLABLE = ("--epochs", "120", "--train.patience", "200")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- kill -9, then re-run


def start_cli(source: Path, workdir: Path, *extra: str, train: tuple[str, ...] = KILLABLE) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [sys.executable, "flows/full.py", "--source", str(source), "--workdir", str(workdir), *QUICK, *train, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # the kill reaches every process of the run
    )


def outputs(workdir: Path) -> dict[str, str]:
    """What a finished run leaves, by content: manifest, stats, shards, weights, metrics."""
    index = next(workdir.rglob("index.json"))
    card = json.loads(next(workdir.glob("registry/tinynet/v*/card.json")).read_text())
    return {
        "manifest": next(workdir.glob("manifests/*.json")).name,
        "stats": sha256(next(workdir.glob("stats/*.json"))),
        "shards": json.dumps({e["name"]: e["sha256"] for e in shard_files.read_index(str(index))["shards"]}),
        "weights": sha256(next(workdir.glob("registry/tinynet/v*/model.pt"))),
        "metrics": json.dumps(card["metrics"], sort_keys=True),
    }


@pytest.fixture(scope="module")
def zipped_subset(small_source, tmp_path_factory) -> Path:
    """The small subset as a zip, so that the download stage has real extraction work to interrupt."""
    path = tmp_path_factory.mktemp("zip") / "chest_xray.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(small_source.rglob("*.jpeg")):
            archive.write(file, Path("chest_xray") / file.relative_to(small_source))
    return path


@pytest.fixture(scope="module")
def clean_outputs(zipped_subset, tmp_path_factory) -> dict[str, str]:
    workdir = tmp_path_factory.mktemp("clean")
    run = start_cli(zipped_subset, workdir)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    return outputs(workdir)


def _reaches(workdir: Path, stage: str, log: list[str]) -> bool:
    text = "".join(log)
    if stage == "download":  # extraction has begun: the zip's folder is being filled
        return any((workdir / "downloads").rglob("*.jpeg"))
    if stage == "sizes":
        return "download-" in text and "Finished in state" in text.split("download-", 1)[1]
    if stage == "transform":
        return len(list((workdir / "shards").rglob("*.h5"))) >= 2
    if stage == "train":
        return "epoch 50/" in text
    raise ValueError(stage)


# One worker runs the four kills, so that the clean run they compare with is made once.
@pytest.mark.xdist_group("kill-9")
@pytest.mark.parametrize("stage", ["download", "sizes", "transform", "train"])
def test_kill_9_then_rerun_gives_the_outputs_of_a_clean_run(stage, zipped_subset, clean_outputs, tmp_path):
    workdir = tmp_path / "work"
    run = start_cli(zipped_subset, workdir)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(run.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not _reaches(workdir, stage, log):
        assert run.poll() is None, f"the run ended before the {stage} stage was reached:\n{''.join(log)}"
        assert time.monotonic() < deadline, f"the {stage} stage was not reached in time"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not list(workdir.glob("registry/tinynet/v*/card.json")), "killed too late: the run had finished"

    rerun = start_cli(zipped_subset, workdir)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert outputs(workdir) == clean_outputs
    # Nothing half-written is visible: every file that is not a dot-file parses or is complete.
    for path in workdir.rglob("*.h5"):
        assert not path.name.startswith(".")


# --------------------------------------------------------------------------- transient S3 errors


@pytest.fixture
def flaky_s3(s3_bucket, monkeypatch):
    """The S3 settings pointed at a fault-injecting proxy in front of the moto server."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], delay_seconds=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setitem(storage.S3_CLIENT_OPTIONS, "read_timeout", 1)
        # Fewer attempts than production keeps botocore's backoff (and the test) short.
        monkeypatch.setitem(storage.S3_CLIENT_OPTIONS, "retries", {"max_attempts": 3, "mode": "standard"})
        storage._s3_client.cache_clear()
        yield s3_bucket, proxy
        storage._s3_client.cache_clear()


@pytest.mark.parametrize("fault", ["slowdown", "reset", "timeout"])
def test_transient_s3_errors_are_retried_by_botocore(flaky_s3, fault, tmp_path):
    bucket, proxy = flaky_s3
    uri = f"s3://{bucket}/run/shards/train-0000.h5"
    source = tmp_path / "shard.bin"
    source.write_bytes(os.urandom(300_000))
    for method in ("PUT", "HEAD", "GET"):
        proxy.plan.add(fault, method, times=2)

    storage.upload_file(source, uri)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == source.read_bytes()
    proxy.plan.add(fault, "PUT", times=2)
    storage.write_json(f"s3://{bucket}/run/registry/m/v0001/card.json", {"ok": 1}, if_absent=True)
    assert storage.read_json(f"s3://{bucket}/run/registry/m/v0001/card.json") == {"ok": 1}
    assert {f for f, _, _ in proxy.plan.injected} == {fault}
    assert len(proxy.plan.injected) == 8


def test_a_fault_burst_beyond_botocore_is_retried_by_prefect(flaky_s3, subset_source, tmp_path):
    bucket, proxy = flaky_s3
    manifest = build_manifest(subset_source)
    spec = shards.plan_shards(
        manifest, SplitConfig(), seed_transform(size=(224, 224)), 50, f"s3://{bucket}/shards"
    )[0]
    # More consecutive 503s than botocore's 3 attempts: the task fails once, then Prefect retries it.
    proxy.plan.add("slowdown", "PUT", times=4)

    @flow
    def one_shard():
        return write_shard.with_options(retries=2, retry_delay_seconds=0, cache_policy=None)(spec)

    state = one_shard(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert storage.exists(result.uri)
    assert len([f for f in proxy.plan.injected if f[0] == "slowdown"]) == 4
    assert shard_files.shard_problem(result.uri, result.sha256) is None


# --------------------------------------------------------------------------- a transform worker dies


def kill_a_busy_pool_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first transform worker seen computing: a forkserver child with CPU time spent."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                if "multiprocessing.forkserver" in " ".join(child.parent().cmdline()) and child.cpu_times().user > 0.2:
                    child.kill()
                    killed.append(child.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.005)


def test_a_killed_transform_worker_fails_one_try_and_the_retry_gets_a_fresh_pool(subset_source, tmp_path):
    from tests.helpers import shard_stage

    manifest_uri = save_manifest(build_manifest(subset_source), str(tmp_path / "manifests"))
    # The exact recipe at 1000 x 1300 keeps each worker busy for about a second per shard.
    args = (manifest_uri, SplitConfig(), seed_transform(method="exact"), 100)

    @flow
    def stage(workdir: str, retries: int, runner: str, workers: int):
        return shard_stage(*args, workdir, retries, runner, workers, root=str(subset_source))

    reference = stage(str(tmp_path / "threads"), 0, "threads", 1)

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_busy_pool_worker, args=(stop, killed))
    killer.start()
    try:
        state = stage(str(tmp_path / "processes"), 2, "processes", 2, return_state=True)
    finally:
        stop.set()
        killer.join()

    assert killed, "no busy transform worker was seen"
    assert state.is_completed(), state.message
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    tries = [run.run_count for run in runs if run.name.startswith("write-shard-") and "index" not in run.name]
    assert max(tries) == 2 and all(run.state.is_completed() for run in runs)
    index = state.result()
    assert [s["sha256"] for s in shard_files.read_index(index.uri)["shards"]] == [
        s["sha256"] for s in shard_files.read_index(reference.uri)["shards"]
    ]


# --------------------------------------------------------------------------- corrupted shards


def test_a_corrupted_shard_is_caught_by_its_sha256_and_rebuilt(small_source, tmp_path):
    workdir = tmp_path / "work"
    train = {"epochs": 2, "patience": 2}
    summary = full(source=str(small_source), workdir=str(workdir), train=train, runner="threads", shard_size=200, **ROBUST3)
    index_uri = summary["shards_index"]
    entry = shard_files.read_index(index_uri)["shards"][0]
    victim = Path(index_uri).parent / entry["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of the features
    victim.write_bytes(bytes(data))

    with pytest.raises(shard_files.CorruptShard, match="sha256"):
        shard_files.load_split(index_uri, entry["split"])
    full(source=str(small_source), workdir=str(workdir), train=train, runner="threads", shard_size=200, **ROBUST3)
    assert sha256(victim) == entry["sha256"]
    assert len(shard_files.load_split(index_uri, entry["split"]).labels) > 0


# --------------------------------------------------------------------------- concurrent registration


def test_two_flows_registering_at_once_get_distinct_versions(small_source, tmp_path):
    registry = tmp_path / "registry"
    runs = [
        start_cli(small_source, tmp_path / f"work{i}", "--registry", str(registry), "--seed", str(i),
                  train=("--epochs", "2", "--train.patience", "2"))
        for i in range(2)
    ]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    versions = sorted(p.name for p in (registry / "tinynet").glob("v*"))
    assert versions == ["v0001", "v0002"]
    seeds = {json.loads((registry / "tinynet" / v / "card.json").read_text())["config"]["train"]["seed"] for v in versions}
    assert seeds == {0, 1}
    weights = {sha256(registry / "tinynet" / v / "model.pt") for v in versions}
    assert len(weights) == 2
