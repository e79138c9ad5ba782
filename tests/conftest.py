"""Fixtures shared by every test folder: the real dataset, a real S3 endpoint, a real Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import copy_patient_subset, free_port, use_s3_endpoint, wait_for_port

# The CLI's runs in tests use a temporary Prefect server each, as before (flows/runtime.py), never the
# user's local server that stays; tests about that server set their own PNEUMO_SERVER_DIR and mode.
os.environ.setdefault("PNEUMO_PREFECT_SERVER", "temporary")
os.environ.setdefault("PNEUMO_SERVER_DIR", str(Path(tempfile.gettempdir()) / f"pneumo-tests-server-{os.getpid()}"))

# Commands started as `python -m cli` (tests/helpers.pneumo_command) import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))

# ../shared beside the clone; PNEUMO_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(
    os.environ.get("PNEUMO_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray_224"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Kaggle train split (224x224 copy) beside the repository."""
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"real dataset missing: expected {SHARED_DATA} (see ../shared/data/chest_xray_224/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def subset_source(shared_data, tmp_path_factory) -> Path:
    """About 500 real images, whole patients only, in the Kaggle layout (train split only)."""
    return copy_patient_subset(shared_data, tmp_path_factory.mktemp("subset"), per_class=250)


@pytest.fixture(scope="session")
def small_source(shared_data, tmp_path_factory) -> Path:
    """About 160 real images of whole patients: enough to carve train, val and test, for runs whose
    assertions do not depend on how well the model learns (faults, secrets, deployments)."""
    return copy_patient_subset(shared_data, tmp_path_factory.mktemp("small"), per_class=80)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API server (SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint: moto's server in its own process on a free port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket on the moto endpoint, with the standard AWS settings pointing at it."""
    from pneumo import storage

    bucket = use_s3_endpoint(monkeypatch, s3_endpoint)
    yield bucket
    storage._s3_client.cache_clear()
