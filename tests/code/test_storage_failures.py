"""Storage under failure: bounded waits on a dead endpoint, S3 errors that say what and why,
temporary names that do not grow with the target's, and the sweep of killed runs' leftovers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneumo import download, storage
from tests.faults.s3_fault_proxy import FaultProxy

LONG_NAME = "IM-" + "x" * 247 + ".jpeg"  # 255 bytes, the most a Linux file name can have


# --------------------------------------------------------------------------- a dead endpoint


@pytest.fixture
def dead_endpoint():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.slow  # waits out S3 timeouts: in `make test`, not `make test-fast`
def test_a_dead_endpoint_fails_within_the_configured_bound_and_names_itself(dead_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("PNEUMO_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("PNEUMO_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("PNEUMO_S3_MAX_ATTEMPTS", "2")
    storage._s3_client.cache_clear()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            storage.exists("s3://some-bucket/manifests/m.json")
        except BaseException as error:  # noqa: BLE001
            outcome.append(error)

    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=20)
    seconds = time.monotonic() - started
    storage._s3_client.cache_clear()
    # 2 attempts x 1 s read timeout plus botocore's backoff; the old settings waited 9 x 60 s.
    assert not worker.is_alive(), "the call was still waiting after 20 s"
    assert seconds < 10
    (error,) = outcome
    assert isinstance(error, storage.S3Error) and not error.retryable
    assert dead_endpoint in str(error) and "s3://some-bucket/manifests/m.json" in str(error)
    assert "PNEUMO_S3_READ_TIMEOUT" in str(error)


def test_default_bounds_keep_a_dead_endpoint_near_a_minute(monkeypatch):
    for name in storage.S3_ENV.values():
        monkeypatch.delenv(name, raising=False)
    options = storage.s3_client_options()
    attempts = storage.s3_attempts(options)
    # Each attempt waits at most the read timeout; standard-mode backoff adds under 2**attempt s.
    worst = attempts * (options["connect_timeout"] + options["read_timeout"]) + sum(2**i for i in range(attempts))
    assert worst <= 90


def test_bad_timeout_settings_are_refused(monkeypatch):
    monkeypatch.setenv("PNEUMO_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PNEUMO_S3_READ_TIMEOUT"):
        storage.s3_client_options()
    monkeypatch.setenv("PNEUMO_S3_READ_TIMEOUT", "0")
    with pytest.raises(ValueError, match="greater than 0"):
        storage.s3_client_options()


# --------------------------------------------------------------------------- S3 errors that say what and why


def test_a_missing_bucket_is_named(s3_bucket):
    uri = "s3://no-such-bucket-pneumo/manifests/m.json"
    with pytest.raises(storage.S3Error) as caught:
        storage.read_bytes(uri)
    assert caught.value.kind == "missing bucket" and not caught.value.retryable
    assert uri in str(caught.value) and "does not exist" in str(caught.value)
    assert os.environ["AWS_ENDPOINT_URL"] in str(caught.value)


@pytest.mark.parametrize(
    ("method", "fault", "call", "kind", "says"),
    [
        ("HEAD", "error:403:Forbidden", lambda uri: storage.exists(uri), "credentials or permissions", "403"),
        ("GET", "error:403:AccessDenied", lambda uri: storage.read_bytes(uri), "permissions", "permission denied"),
        ("PUT", "error:403:InvalidAccessKeyId", lambda uri: storage.write_bytes(uri, b"x"), "credentials", "credentials look wrong"),
        ("PUT", "error:403:SignatureDoesNotMatch", lambda uri: storage.write_bytes(uri, b"x"), "credentials", "AWS_SECRET_ACCESS_KEY"),
        ("GET", "error:400:ExpiredToken", lambda uri: storage.read_bytes(uri), "credentials", "AWS_SESSION_TOKEN"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
@pytest.mark.slow  # an S3 endpoint and a fault proxy: in `make test`, not `make test-fast`
def test_refused_requests_name_the_object_and_the_likely_cause(s3_bucket, monkeypatch, method, fault, call, kind, says):
    uri = f"s3://{s3_bucket}/registry/tinynet/v0001/card.json"
    storage.write_bytes(uri, b"{}")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._s3_client.cache_clear()
        proxy.plan.add(fault, method, times=1)
        with pytest.raises(storage.S3Error) as caught:
            call(uri)
    storage._s3_client.cache_clear()
    message = str(caught.value)
    assert caught.value.kind == kind and not caught.value.retryable
    assert uri in message and proxy.url in message and says in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message


@pytest.mark.slow  # an S3 endpoint and a fault proxy: in `make test`, not `make test-fast`
def test_throttling_stays_retryable(s3_bucket, monkeypatch):
    uri = f"s3://{s3_bucket}/x.json"
    monkeypatch.setenv("PNEUMO_S3_MAX_ATTEMPTS", "1")
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._s3_client.cache_clear()
        proxy.plan.add("slowdown", "PUT", times=1)
        with pytest.raises(storage.S3Error) as caught:
            storage.write_bytes(uri, b"{}")
    storage._s3_client.cache_clear()
    assert caught.value.kind == "throttled" and caught.value.retryable and uri in str(caught.value)


# --------------------------------------------------------------------------- 255-byte names


def test_a_255_byte_object_name_downloads_and_writes(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/data/train/NORMAL/{LONG_NAME}"
    storage.write_bytes(uri, b"jpeg bytes")
    local = tmp_path / "train" / "NORMAL" / LONG_NAME
    storage.download_file(uri, local)
    assert local.read_bytes() == b"jpeg bytes"
    storage.write_bytes(str(tmp_path / LONG_NAME), b"atomic")
    assert (tmp_path / LONG_NAME).read_bytes() == b"atomic"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [LONG_NAME, LONG_NAME]


def test_an_s3_prefix_source_with_a_255_byte_object_name_is_fetched(s3_bucket, tmp_path):
    storage.write_bytes(f"s3://{s3_bucket}/data/train/NORMAL/{LONG_NAME}", b"jpeg bytes")
    folder = download.fetch(f"s3://{s3_bucket}/data", tmp_path / "cache")
    assert (folder / "train" / "NORMAL" / LONG_NAME).read_bytes() == b"jpeg bytes"


# --------------------------------------------------------------------------- leftovers of killed runs

KILLED_WRITER = """
import os, sys
from pathlib import Path
from pneumo import download, storage
workdir = Path(sys.argv[1])
def die(*_):
    os.kill(os.getpid(), 9)
if sys.argv[2] == "write":
    storage._atomic_local_write(workdir / "manifests" / "m.json", lambda handle: (handle.write(b"half"), die()), False)
else:
    download._publish_dir(workdir / "downloads" / "extracted" / "abcd", lambda tmp: ((tmp / "a.jpeg").write_bytes(b"x"), die()), print)
"""


def _killed_writer(workdir: Path, what: str) -> None:
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(workdir), what], cwd=Path(__file__).parents[2])
    assert run.returncode == -9


@pytest.mark.slow  # processes and an S3 endpoint: in `make test`, not `make test-fast`
def test_leftovers_of_killed_runs_are_swept_and_a_live_runs_files_are_not(tmp_path):
    workdir = tmp_path / "work"
    _killed_writer(workdir, "write")
    _killed_writer(workdir, "extract")
    # What earlier versions left: ".{name}.{random}.tmp", ".{name}.part", ".{name}.partial-{random}".
    (workdir / "manifests" / ".manifest-ab.json.x1y2.tmp").write_bytes(b"old")
    (workdir / "downloads" / "downloads" / "f00").mkdir(parents=True)
    (workdir / "downloads" / "downloads" / "f00" / ".chest_xray.zip.part").write_bytes(b"old")
    (workdir / "downloads" / "extracted" / ".ef01.partial-q9").mkdir()
    stale = sorted(str(p) for p in workdir.rglob(".*"))
    assert len(stale) == 5, stale
    # A published dataset may hold dot-files of its own: never touched.
    dataset = workdir / "downloads" / "extracted" / "0123"
    dataset.mkdir()
    (dataset / ".IM-0001.jpeg.tmp").write_bytes(b"user data")
    time.sleep(0.05)
    started = time.time()
    # A concurrent run's temporaries: a live owner, or newer than this run's start.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = workdir / "shards" / f".pneumo-{sleeper.pid}-abcd.tmp"
        live.parent.mkdir()
        live.write_bytes(b"being written")
        os.utime(live, (started - 60, started - 60))
        fresh = workdir / "manifests" / ".manifest-cd.json.z9.tmp"
        time.sleep(0.05)
        fresh.write_bytes(b"being written")

        removed = download.sweep_workdir(workdir, started)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(str(p) for p in removed) == stale
    assert live.exists() and fresh.exists() and (dataset / ".IM-0001.jpeg.tmp").exists()
    assert [p for p in workdir.rglob(".*") if p not in (live, fresh, dataset / ".IM-0001.jpeg.tmp")] == []
