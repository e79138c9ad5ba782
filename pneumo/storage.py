"""One small interface over local paths and ``s3://`` URIs.

Every write is atomic: a local file is written under a temporary name and renamed;
an S3 object is one PUT (or one completed multipart upload), so readers see either
the whole object or nothing. ``if_absent=True`` never replaces an existing object,
which is what keeps registry versions immutable.

The S3 endpoint and credentials come from the standard AWS configuration
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, environment, config files), never from here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

S3_PREFIX = "s3://"


class AlreadyExists(FileExistsError):
    """Raised by ``if_absent`` writes when the target is already there."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (S3) or the OS separator (local)."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


# Standard retry mode retries throttling (503 SlowDown), connection resets and timeouts
# with exponential backoff; Prefect's task retries sit on top of these.
S3_CLIENT_OPTIONS = {
    "retries": {"max_attempts": 8, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


@functools.lru_cache(maxsize=None)
def _s3_client():
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(**S3_CLIENT_OPTIONS))


def s3_client():
    """The process-wide boto3 S3 client (created lazily, from the AWS environment)."""
    return _s3_client()


def _is_missing(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in {"404", "NoSuchKey", "NotFound"}


def _is_precondition_failed(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in {"412", "PreconditionFailed", "ConditionalRequestConflict"}


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if _is_missing(error):
            return False
        raise


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _is_missing(error):
            raise FileNotFoundError(uri) from None
        raise


def _atomic_local_write(path: Path, fill, if_absent: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if if_absent:
            # link() fails if the target exists: an atomic create-if-absent.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(str(path)) from None
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(uri: str, data: bytes, *, if_absent: bool = False) -> None:
    """Write ``data`` atomically; with ``if_absent``, raise AlreadyExists instead of replacing."""
    if not is_s3(uri):
        _atomic_local_write(Path(uri), lambda handle: handle.write(data), if_absent)
        return
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    extra = {"IfNoneMatch": "*"} if if_absent else {}
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
    except ClientError as error:
        if if_absent and _is_precondition_failed(error):
            raise AlreadyExists(uri) from None
        raise


def upload_file(local_path: str | Path, uri: str, *, if_absent: bool = False) -> None:
    """Copy a local file to ``uri`` atomically."""
    if not is_s3(uri):
        with open(local_path, "rb") as source:
            _atomic_local_write(Path(uri), lambda handle: shutil.copyfileobj(source, handle), if_absent)
        return
    if if_absent:
        # Conditional writes need a single PUT; artifacts guarded this way are small.
        write_bytes(uri, Path(local_path).read_bytes(), if_absent=True)
        return
    bucket, key = split_s3(uri)
    # upload_file uses multipart for large files; the object appears only on completion.
    s3_client().upload_file(str(local_path), bucket, key)


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy ``uri`` to a local path atomically."""
    local_path = Path(local_path)
    if not is_s3(uri):
        upload_file(uri, str(local_path))
        return
    bucket, key = split_s3(uri)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_path.with_name(f".{local_path.name}.part")
    s3_client().download_file(bucket, key, str(tmp))
    os.replace(tmp, local_path)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """Yield a local path holding the object at ``uri`` (the file itself when local)."""
    if not is_s3(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(uri)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="pneumo-") as tmp:
        path = Path(tmp, Path(split_s3(uri)[1]).name or "object")
        download_file(uri, path)
        yield path


def list_uris(prefix: str) -> list[str]:
    """All object URIs under ``prefix`` (files, recursively, for local paths), sorted."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.exists():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    uris = []
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        uris.extend(f"{S3_PREFIX}{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    return sorted(uris)


def delete(uri: str) -> None:
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            Path(uri).unlink()
        return
    bucket, key = split_s3(uri)
    s3_client().delete_object(Bucket=bucket, Key=key)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any, *, if_absent: bool = False) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    write_bytes(uri, data, if_absent=if_absent)


# --- Compare-and-swap ---------------------------------------------------------------------
#
# A small object that several writers may replace (a registry alias) is read together with
# a token, and replaced only if it still carries that token. On S3 the token is the ETag and
# the write is a conditional PUT (If-Match, or If-None-Match: * while the object is absent).
# Locally the token is the sha256 of the content, and the compare and the rename happen
# under an exclusive flock on a sidecar ``.<stem>.lock`` file, so they are one step.


class Conflict(Exception):
    """Raised by ``compare_and_swap`` when the object changed since its token was read."""


def _local_token(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_with_token(uri: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and its token for ``compare_and_swap``; (None, None) when absent."""
    if not is_s3(uri):
        try:
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, _local_token(data)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return None, None
        raise
    return response["Body"].read(), response["ETag"]


@contextlib.contextmanager
def _local_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def compare_and_swap(uri: str, data: bytes, expected_token: str | None) -> None:
    """Replace the object at ``uri`` with ``data`` only if it still has ``expected_token``.

    ``expected_token`` comes from ``read_with_token``; None means "only if the object does
    not exist yet". Raises Conflict when another writer got there first: read again,
    decide again, and retry.
    """
    if not is_s3(uri):
        path = Path(uri)
        with _local_lock(path):
            _, current = read_with_token(uri)
            if current != expected_token:
                raise Conflict(f"{uri} changed since it was read")
            _atomic_local_write(path, lambda handle: handle.write(data), if_absent=False)
        return
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    condition = {"IfNoneMatch": "*"} if expected_token is None else {"IfMatch": expected_token}
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as error:
        # 412: the ETag no longer matches; 409: a concurrent conditional write won; 404: the
        # object was deleted since it was read (If-Match on a missing key).
        if _is_precondition_failed(error) or _is_missing(error) or error.response.get("Error", {}).get("Code") == "409":
            raise Conflict(f"{uri} changed since it was read") from None
        raise
