"""Fixtures shared by every test folder: the real dataset, a real S3 endpoint, a real Prefect server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import copy_patient_subset, free_port, use_s3_endpoint, wait_for_port

# One Prefect server per test session, never the user's: the local server (cli/server.py) of a folder
# of the session's own, started by the first test that needs it (the prefect_server fixture, or a CLI
# run without PREFECT_API_URL) and stopped when the session ends. Each xdist worker (its own pid) has
# its own: its tests run one at a time, so "the last run" is its own, and no two share SQLite.
os.environ["PNEUMO_SERVER_DIR"] = str(Path(tempfile.gettempdir()) / f"pneumo-tests-server-{os.getpid()}")

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
def prefect_server() -> str:
    """The session's Prefect server; its API URL set here and exported (PREFECT_API_URL) to CLI subprocesses."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cli import server

    local, _ = server.ensure_running()
    os.environ["PREFECT_API_URL"] = local.api_url
    with temporary_settings({PREFECT_API_URL: local.api_url}):
        yield local.api_url


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` again: a test marked xdist_group("g") gets "@g" at the end of its node id, which sends its
    group to one worker (its module and session fixtures built once). pytest-xdist 3.8 appends it through
    ``Item._nodeid``, which pytest 9.2 no longer reads (its id is ``Item._id``): without this, every group was
    split across both workers and each built the stack, the trained model and the module runs again."""
    if not config.getoption("loadgroup", default=False) or not items or not hasattr(items[0], "_id"):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if not groups and uses_a_module_fixture(item):  # a module's shared fixture, built once: its tests on one worker
            groups = [item.module.__name__]
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = type(item._id).parse(item.nodeid + suffix)


def uses_a_module_fixture(item) -> bool:
    fixtures = getattr(item, "_fixtureinfo", None)
    return fixtures is not None and any(
        definition.scope == "module" for definitions in fixtures.name2fixturedefs.values() for definition in definitions
    )


def pytest_sessionfinish(session):
    """The session's server stops with the session (each xdist worker stops its own); its folder goes too,
    unless a test failed (its server.log may say why)."""
    from cli import server

    if server.read_record() is not None:
        with contextlib.suppress(Exception):  # this process's last logs reach the server before it stops
            from prefect.logging.handlers import APILogHandler

            APILogHandler.flush()
        server.stop()
    if not session.testsfailed:  # 5-40 MB of database per worker, left in /tmp by every run before
        shutil.rmtree(os.environ["PNEUMO_SERVER_DIR"], ignore_errors=True)


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
