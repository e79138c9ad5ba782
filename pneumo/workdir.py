"""The workdir's layout: where each stage keeps its files under a run's workdir (a folder or s3://).

    downloads/        fetched and extracted sources (local workdir; an S3 workdir uses ~/.cache/pneumo)
    manifests/        one manifest per dataset version
    stats/            image-size percentiles
    shards/           HDF5 shards and their index
    reports/          quarantine reports
    registry/         the model registry (unless --registry puts it elsewhere)
    prefect-results/  Prefect's task results and cache records
    predictions/      batch scoring: predictions/{model}/{version}/...
    runs/             one record per run of the full flow (pneumo/cleanup.py: what `pneumo gc` keeps)
    secrets/patient-salt  the salt patient ids are hashed with (pneumo.dicom.patient_hash); never logged

No Prefect here: the tasks, flows and library steps all ask this module.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pneumo import storage

DOWNLOADS = "downloads"
LOCAL_CACHE = Path.home() / ".cache" / "pneumo"  # the local side of an S3 workdir


def absolute(uri: str) -> str:
    """A local path made absolute (tasks may run in another working directory); s3:// as is."""
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def local_root(workdir: str) -> Path:
    """The local folder a run downloads into and sweeps: the workdir itself, or ~/.cache/pneumo for an S3 workdir."""
    return LOCAL_CACHE if storage.is_s3(workdir) else Path(workdir)


def downloads(workdir: str) -> Path:
    """Where sources are fetched and extracted (always local: images are read from disk)."""
    return local_root(workdir) / DOWNLOADS


def manifests(workdir: str) -> str:
    return storage.join(workdir, "manifests")


def stats(workdir: str) -> str:
    return storage.join(workdir, "stats")


def shards(workdir: str) -> str:
    return storage.join(workdir, "shards")


def reports(workdir: str) -> str:
    return storage.join(workdir, "reports")


def registry(workdir: str) -> str:
    return storage.join(workdir, "registry")


def prefect_results(workdir: str) -> str:
    return storage.join(workdir, "prefect-results")


def runs(workdir: str) -> str:
    return storage.join(workdir, "runs")


def predictions(workdir: str, model_name: str, version: str) -> str:
    return storage.join(workdir, "predictions", model_name, version)


PATIENT_SALT_ENV = "PNEUMO_PATIENT_SALT"  # a salt of the user's own, e.g. shared by several workdirs


def patient_salt(workdir: str) -> str:
    """The workdir's secret salt for patient ids: $PNEUMO_PATIENT_SALT, else ``secrets/patient-salt``
    (created once with 256 random bits, readable by its owner only; every run of the workdir
    shares it, so a patient hashes alike in every manifest). Its value is never logged."""
    if given := os.environ.get(PATIENT_SALT_ENV, "").strip():
        return given
    uri = storage.join(workdir, "secrets", "patient-salt")
    try:
        storage.write_bytes(uri, secrets.token_hex(32).encode(), if_absent=True)
        if not storage.is_s3(uri):
            os.chmod(uri, 0o600)
    except storage.AlreadyExists:
        pass  # the workdir's salt, made by an earlier run
    return storage.read_bytes(uri).decode().strip()
