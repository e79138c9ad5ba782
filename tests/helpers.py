"""Small helpers shared by the test folders."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import subprocess
import struct
import sys
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pneumo.config import SplitConfig, TransformConfig, seed_transform
from pneumo.download import parse_patient_id
from pneumo.manifest import ImageRecord, Manifest, save_manifest
from pneumo.recipes import RECIPES


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


def task_states(flow_run_id, expected: tuple[str, ...] = (), wait: float = 30.0) -> dict[str, list[str]]:
    """State names of every task run of a flow run and its subflows, by task name.

    Prefect 3 reports task runs to the API through events, which arrive a moment after the
    flow returns (seconds on a loaded machine): wait until every ``expected`` task name is
    there and every task run has reached a final state.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    deadline = time.monotonic() + wait
    while True:
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
        settled = all(run.state is not None and run.state.is_final() for run in task_runs)
        if (settled and set(expected) <= set(states)) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


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


# --------------------------------------------------------------------------- the `pneumo` command


def pneumo_command(*args: str) -> list[str]:
    """The `pneumo` command of this checkout (the console script `pneumo = "cli:main"` runs the same function)."""
    return [sys.executable, "-m", "cli", *args]


class Invoked(NamedTuple):
    exit_code: int
    output: str  # stdout and stderr, as a terminal shows them


def invoke(*args: str) -> Invoked:
    """`pneumo ARGS` in this process, its output captured: for commands that import neither Prefect nor torch."""
    import contextlib
    import io

    from cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            main(list(args))
        except SystemExit as exit:
            return Invoked(exit.code if isinstance(exit.code, int) else 1, output.getvalue())
    return Invoked(0, output.getvalue())


# For flow runs whose assertions do not depend on the recipe: robust3's (12 renditions, no test-time
# views), about a third of the default robust4's shard and scoring work. Pass as full_flow(**ROBUST3).
ROBUST3: dict[str, Any] = {"recipe": "robust3", **RECIPES["robust3"]}


def full_flow(**settings: Any) -> Any:
    """The full flow with flat settings (source=..., retries=..., train={...}): the run section's go into ``run``."""
    from flows.full import full
    from pneumo.config import RunOptions

    run = {name: settings.pop(name) for name in list(settings) if name in RunOptions.model_fields}
    return full(run=run, **settings)


def shard_stage(manifest_uri: str, split: SplitConfig, transform: TransformConfig, shard_size: int, workdir: str,
                retries: int, runner: str, workers: Any = None, dask_address: Any = None, *, root: str) -> Any:
    """Stage 3 as the full flow runs it (plan, write-shard mapped on ``runner``, index), inside a flow of the caller's."""
    from flows.full import write_shards
    from pneumo import shards
    from pneumo.config import RunConfig
    from tasks.shards import write_index

    run = {"runner": runner, "workers": workers, "dask_address": dask_address, "retries": retries, "shard_size": shard_size}
    config = RunConfig(run=run, transform=transform, split=split)
    plan = shards.plan(manifest_uri, root, split, transform, shard_size, workdir)
    return write_index(plan, write_shards(plan.specs, config, workdir))


def run_pneumo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(pneumo_command(*args), capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- cached tasks


def cached_tasks() -> list:
    """Every task in tasks/ that is cached across runs (all but those declared NO_CACHE, such as the drift checks,
    whose events must fire on every run)."""
    import importlib
    import pkgutil

    import tasks
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    found = {}
    for module in pkgutil.iter_modules(tasks.__path__):
        for value in vars(importlib.import_module(f"tasks.{module.name}")).values():
            if isinstance(value, Task) and value.cache_policy is not NO_CACHE:
                found[value.name] = value
    return list(found.values())


def cache_key(task, **inputs) -> str:
    """The cache key ``task`` would use for ``inputs``."""
    from types import SimpleNamespace

    # TASK_SOURCE reads only ``task_ctx.task``; the rest of a run context is not needed for a key.
    return task.cache_policy.compute_key(task_ctx=SimpleNamespace(task=task), inputs=inputs, flow_parameters={})


# --------------------------------------------------------------------------- a tiny Kaggle download


# One small copy of the Kaggle layout: (split, class, file name).
KAGGLE_IMAGES = [
    ("train", "NORMAL", "IM-0115-0001.jpeg"),
    ("train", "NORMAL", "NORMAL2-IM-1427-0001.jpeg"),
    ("train", "PNEUMONIA", "person1000_bacteria_2931.jpeg"),
    ("train", "PNEUMONIA", "person1000_virus_1681.jpeg"),
    ("train", "PNEUMONIA", "person1_bacteria_1.jpeg"),
    ("val", "NORMAL", "NORMAL2-IM-1431-0001.jpeg"),
    ("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg"),
    ("test", "NORMAL", "IM-0001-0001.jpeg"),
    ("test", "PNEUMONIA", "person100_bacteria_475.jpeg"),
]


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


# The stored pixels that EXIF orientation N turns back into the upright picture (the inverse
# of ImageOps.exif_transpose's transposition; 6 and 8 undo each other, the rest undo themselves).
UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def late_exif_png(upright: Image.Image, orientation: int) -> bytes:
    """A PNG whose pixels EXIF ``orientation`` turns into ``upright``, its eXIf chunk after the
    pixel data (just before IEND): Pillow's header parse does not see it, only load() does."""
    stored = upright.transpose(UNDO_ORIENTATION[orientation]) if orientation != 1 else upright
    buffer = io.BytesIO()
    stored.save(buffer, "PNG")
    png = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")  # the chunk holds the TIFF structure only
    end = len(png) - 12  # IEND: length, type, no data, CRC
    assert png[end + 4 : end + 8] == b"IEND" and png.index(b"IDAT") < end
    return png[:end] + png_chunk(b"eXIf", payload) + png[end:]


def write_kaggle_tree(root: Path) -> Path:
    """Write KAGGLE_IMAGES under root in the Kaggle layout; return root."""
    for seed, (split, label, name) in enumerate(KAGGLE_IMAGES):
        path = root / split / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(seed))
    return root


def write_kaggle_zip(path: Path) -> Path:
    """A zip shaped like the real Kaggle archive: chest_xray/, a nested duplicate, __MACOSX junk."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("chest_xray/", "")
        for seed, (split, label, name) in enumerate(KAGGLE_IMAGES):
            data = jpeg_bytes(seed)
            archive.writestr(f"chest_xray/{split}/{label}/{name}", data)
            archive.writestr(f"chest_xray/chest_xray/{split}/{label}/{name}", data)
            archive.writestr(f"__MACOSX/chest_xray/{split}/{label}/._{name}", b"\x00\x05\x16\x07AppleDouble")
            archive.writestr(f"chest_xray/__MACOSX/chest_xray/{split}/{label}/._{name}", b"\x00\x05\x16\x07")
        archive.writestr("chest_xray/.DS_Store", b"junk")
        archive.writestr("chest_xray/train/.DS_Store", b"junk")
    return path


def all_paths(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, relative, with forward slashes."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --------------------------------------------------------------------------- a tiny shard dataset

SHARD_TRANSFORM = seed_transform(size=(100, 130))  # small target: the shard tests are about storage, not images
SHARD_SPLIT_CONFIG = SplitConfig(min_val_images=100)
NOT_A_JPEG = "train/PNEUMONIA/person3_bacteria_1.jpeg"


def write_shard_dataset(folder: Path) -> tuple[Manifest, str, str]:
    """24 images of 12 patients (``NOT_A_JPEG`` is not an image) and their saved manifest, under ``folder``.

    Returns the manifest, its URI and the folder for the shards.
    """
    root = folder / "data"
    records = []
    for patient in range(12):
        label = patient % 2
        for image in range(2):
            split = "test" if patient >= 10 else "train"
            name = f"IM-{patient:04d}-{image:04d}.jpeg" if label == 0 else f"person{patient}_bacteria_{image}.jpeg"
            relpath = f"{split}/{['NORMAL', 'PNEUMONIA'][label]}/{name}"
            path = root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = np.random.default_rng(patient * 10 + image).integers(0, 256, (60, 80), dtype=np.uint8)
            Image.fromarray(noise).save(path, quality=90)
            data = path.read_bytes()
            records.append(
                ImageRecord(relpath=relpath, split=split, label=label, patient_id=str(patient), bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest())
            )
    bad = b"<html>not an image</html>"
    (root / NOT_A_JPEG).write_bytes(bad)  # listed in the manifest with its own hash, refused by the transform
    hashed = {"bytes": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    records = [r.model_copy(update=hashed) if r.relpath == NOT_A_JPEG else r for r in records]
    manifest = Manifest(root=str(root), records=records)
    return manifest, save_manifest(manifest, str(folder / "manifests")), str(folder / "shards")
