"""Small helpers shared by the test folders."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
import uuid
from pathlib import Path

from pneumo.download import parse_patient_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def copy_patient_subset(shared: Path, target: Path, per_class: int) -> Path:
    """Copy whole patients (chosen by a hash of their id) until each class has ``per_class`` images."""
    for name in ("NORMAL", "PNEUMONIA"):
        by_patient: dict[str, list[Path]] = {}
        for path in sorted((shared / "train" / name).iterdir()):
            by_patient.setdefault(parse_patient_id(path.name), []).append(path)
        chosen = 0
        for patient in sorted(by_patient, key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
            out = target / "train" / name
            out.mkdir(parents=True, exist_ok=True)
            for path in by_patient[patient]:
                shutil.copy2(path, out / path.name)
            chosen += len(by_patient[patient])
            if chosen >= per_class:
                break
    return target


def task_states(flow_run_id) -> dict[str, list[str]]:
    """State names of every task run of a flow run and its subflows, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        run_ids = [flow_run_id]
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        run_ids += [child.id for child in children]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    states: dict[str, list[str]] = {}
    for run in task_runs:
        # Task run names are "<task name>-<3 hex>".
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def use_s3_endpoint(env, endpoint: str, key_id: str = "testing-key-id", secret: str = "testing-secret") -> str:
    """Point the standard AWS settings at ``endpoint`` (through ``env``, a MonkeyPatch); return a fresh bucket."""
    from pneumo import storage

    env.setenv("AWS_ENDPOINT_URL", endpoint)
    env.setenv("AWS_ACCESS_KEY_ID", key_id)
    env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.delenv(name, raising=False)
    storage._s3_client.cache_clear()
    bucket = f"pneumo-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    return bucket
