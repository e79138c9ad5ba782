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
import re
import shutil
import stat as stat_module
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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
# with exponential backoff; Prefect's task retries sit on top of these for 5xx bursts.
# The bounds keep a dead endpoint (one that accepts connections and never answers) from
# hanging a run: at most max_attempts x read_timeout plus a few seconds of backoff per
# call, about a minute by default. Each can be set through the environment (S3_ENV).
S3_CLIENT_OPTIONS = {
    "retries": {"total_max_attempts": 3, "mode": "standard"},  # the first try included
    "connect_timeout": 5,
    "read_timeout": 20,
}
S3_ENV = {
    "connect_timeout": "PNEUMO_S3_CONNECT_TIMEOUT",
    "read_timeout": "PNEUMO_S3_READ_TIMEOUT",
    "max_attempts": "PNEUMO_S3_MAX_ATTEMPTS",
}


def s3_client_options() -> dict[str, Any]:
    """S3_CLIENT_OPTIONS with the PNEUMO_S3_* environment overrides applied (validated)."""
    options = {**S3_CLIENT_OPTIONS, "retries": dict(S3_CLIENT_OPTIONS["retries"])}
    for option, variable in S3_ENV.items():
        text = os.environ.get(variable)
        if not text:
            continue
        try:
            value = float(text) if option != "max_attempts" else int(text)
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not a number") from None
        if value <= 0:
            raise ValueError(f"{variable}={text!r} must be greater than 0")
        if option == "max_attempts":
            options["retries"].pop("max_attempts", None)  # botocore's count of retries, first try excluded
            options["retries"]["total_max_attempts"] = value
        else:
            options[option] = value
    return options


def s3_attempts(options: dict[str, Any]) -> int:
    """Attempts per S3 call, the first one included, under botocore's two ways to say it."""
    retries = options["retries"]
    return retries["total_max_attempts"] if "total_max_attempts" in retries else retries.get("max_attempts", 2) + 1


@functools.lru_cache(maxsize=None)
def _s3_client():
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(**s3_client_options()))


def s3_client():
    """The process-wide boto3 S3 client (created lazily, from the AWS environment)."""
    return _s3_client()


def _is_missing(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in {"404", "NoSuchKey", "NotFound"}


def _is_precondition_failed(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in {"412", "PreconditionFailed", "ConditionalRequestConflict"}


class S3Error(RuntimeError):
    """An S3 call failed; the message names the endpoint, the object and the likely cause.

    ``retryable`` says whether trying again later can help (throttling, 5xx, a dropped
    connection); credentials, permissions, a missing bucket and an endpoint that never
    answers (botocore has already tried it ``max_attempts`` times) cannot.
    """

    def __init__(self, message: str, *, kind: str, retryable: bool):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "AuthorizationHeaderMalformed", "InvalidClientTokenId", "ExpiredTokenException",
}
_PERMISSION_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "429"}
_CREDENTIAL_HINT = "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or AWS_PROFILE"


def _endpoint() -> str:
    return s3_client().meta.endpoint_url


def _client_error(error: Exception, code: str, status: int, what: str) -> S3Error:
    """Classify an S3 error response by its code (and HTTP status when the code says nothing)."""
    detail = getattr(error, "response", {}).get("Error", {}).get("Message") or ""
    said = f"{code} {detail}".strip() if detail and detail != code else code
    if code in _CREDENTIAL_CODES:
        return S3Error(f"{what} was refused: the credentials look wrong ({said}); {_CREDENTIAL_HINT}",
                       kind="credentials", retryable=False)
    if code in _PERMISSION_CODES:
        return S3Error(f"{what} was refused: permission denied ({said}); the credentials were accepted but "
                       "may not do this: check the IAM or bucket policy", kind="permissions", retryable=False)
    if code == "NoSuchBucket":
        return S3Error(f"{what} failed: the bucket does not exist ({said}); check the bucket name and "
                       "AWS_ENDPOINT_URL / the region", kind="missing bucket", retryable=False)
    if code in {"403", "Forbidden"} or status == 403:
        # HEAD answers carry no body, so a bare 403 cannot tell bad credentials from missing rights.
        return S3Error(f"{what} was refused (403 Forbidden, no detail): either the credentials are wrong "
                       f"({_CREDENTIAL_HINT}) or they lack permission for this bucket/key",
                       kind="credentials or permissions", retryable=False)
    if code in {"404", "NoSuchKey", "NotFound"}:
        return S3Error(f"{what} failed: no such object ({said})", kind="missing object", retryable=False)
    if code in _THROTTLE_CODES or status in (429, 503):
        return S3Error(f"{what} was throttled ({said})", kind="throttled", retryable=True)
    if status >= 500 or code in {"InternalError", "ServiceUnavailable", "RequestTimeout"}:
        return S3Error(f"{what} failed on the server side ({said}, HTTP {status})", kind="server error", retryable=True)
    return S3Error(f"{what} failed ({said}, HTTP {status})", kind="other", retryable=False)


@contextlib.contextmanager
def s3_errors(uri: str, operation: str) -> Iterator[None]:
    """Turn botocore's errors inside the block into an S3Error that says what failed and why.

    Messages hold the endpoint, the URI, the error code and a hint, never a credential.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except ClientError as error:
        what = f"S3 {operation} on {uri} at {_endpoint()}"
        info = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        raise _client_error(error, str(info.get("Code", status)), int(status), what) from error
    except S3UploadFailedError as error:  # boto3's managed upload hides the ClientError in its text
        what = f"S3 {operation} on {uri} at {_endpoint()}"
        match = re.search(r"An error occurred \((\w+)\)", str(error))
        code = match.group(1) if match else "unknown"
        raise _client_error(error, code, int(code) if code.isdigit() else 0, what) from error
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise S3Error(f"S3 {operation} on {uri}: {error}; {_CREDENTIAL_HINT}", kind="credentials",
                      retryable=False) from error
    except (ConnectTimeoutError, ReadTimeoutError, EndpointConnectionError) as error:
        options = s3_client_options()
        raise S3Error(
            f"the S3 endpoint {_endpoint()} did not answer {operation} on {uri} "
            f"({type(error).__name__}; {s3_attempts(options)} attempts, connect timeout "
            f"{options['connect_timeout']:g} s, read timeout {options['read_timeout']:g} s): check "
            "AWS_ENDPOINT_URL and the network; PNEUMO_S3_CONNECT_TIMEOUT, PNEUMO_S3_READ_TIMEOUT and "
            "PNEUMO_S3_MAX_ATTEMPTS set these limits",
            kind="unreachable", retryable=False,
        ) from error


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    with s3_errors(uri, "HeadObject"):
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
    with s3_errors(uri, "GetObject"):
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            if _is_missing(error):
                raise FileNotFoundError(uri) from None
            raise


class Unreadable(ValueError):
    """A file or object refused before its bytes are read: not a regular file, or larger than the caller allows."""


def read_chunks(uri: str, *, max_bytes: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a regular local file or an S3 object, ``chunk_bytes`` at a time, for data planted by others.

    Checked before any byte is read: a local path must be a regular file (a FIFO, a device or
    a symbolic link is refused: it is opened non-blocking and without following links, so a
    FIFO cannot hang the reader) and no larger than ``max_bytes`` (its stat, an object's
    ContentLength); a file that grows past ``max_bytes`` while read is refused too. Unreadable
    otherwise; FileNotFoundError when it is absent.
    """
    if is_s3(uri):
        yield from _s3_chunks(uri, max_bytes, chunk_bytes)
        return
    try:
        fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        if os.path.islink(uri):
            raise Unreadable(f"{uri} is a symbolic link, not a regular file") from None
        raise error
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat_module.S_ISREG(info.st_mode):
            raise Unreadable(f"{uri} is not a regular file (mode {stat_module.filemode(info.st_mode)})")
        if info.st_size > max_bytes:
            raise Unreadable(f"{uri} holds {info.st_size} bytes, more than the {max_bytes} allowed")
        yield from _bounded(iter(lambda: handle.read(chunk_bytes), b""), uri, max_bytes)


def _bounded(chunks: Iterator[bytes], uri: str, max_bytes: int) -> Iterator[bytes]:
    seen = 0
    for piece in chunks:
        seen += len(piece)
        if seen > max_bytes:
            raise Unreadable(f"{uri} grew past the {max_bytes} bytes allowed while it was read")
        yield piece


def _s3_chunks(uri: str, max_bytes: int, chunk_bytes: int) -> Iterator[bytes]:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    with s3_errors(uri, "GetObject"):
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                raise FileNotFoundError(uri) from None
            raise
        body = response["Body"]
        try:
            if int(response.get("ContentLength") or 0) > max_bytes:
                raise Unreadable(f"{uri} holds {response['ContentLength']} bytes, more than the {max_bytes} allowed")
            yield from _bounded(body.iter_chunks(chunk_bytes), uri, max_bytes)
        finally:
            body.close()


# Temporary names: fixed length (a 255-byte target name leaves no room to grow) and the
# owner's PID, so a later run can tell a killed run's leftovers from a live run's files.
TEMP_PREFIX = ".pneumo-"
_OWNED_TEMP = re.compile(r"^\.pneumo-(\d+)-")
# Names earlier versions used: ".{name}.{random}.tmp", ".{name}.part", ".{name}.partial-{random}".
_LEGACY_TEMP = re.compile(r"^\..+(\.tmp|\.part|\.partial-[\w-]+)$", re.DOTALL)


def temp_prefix() -> str:
    """Prefix for a temporary file or folder next to its target: ``.pneumo-{pid}-``."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid is alive on this machine (this process included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_temporaries(root: str | Path, started: float, prune: Callable[[Path], bool] = lambda folder: False) -> list[Path]:
    """Remove the temporaries killed runs left under the local folder ``root``; return what went.

    A temporary goes when it is older than ``started`` (this run's start, a Unix time)
    and its owner is gone: the PID in its name is not a live process, or, for names
    without a PID, its age is the only evidence. Fresh temporaries of a concurrent run are
    newer than ``started`` or carry a live PID, and stay. Folders for which ``prune`` is
    true (published datasets) are not searched.
    """
    removed: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        for name in [*dirnames, *filenames]:
            owned = _OWNED_TEMP.match(name)
            if not owned and not _LEGACY_TEMP.fullmatch(name):
                continue
            path = here / name
            try:
                if path.lstat().st_mtime >= started or (owned and pid_alive(int(owned.group(1)))):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        dirnames[:] = [d for d in dirnames if (here / d).is_dir() and here / d not in removed and not prune(here / d)]
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, base: int = 0o666) -> None:
    """Give a temporary the mode a plain ``open()`` (0o666) or ``mkdir`` (0o777) would have.

    mkstemp and mkdtemp create 0600 / 0700 whatever the umask; renamed into place, that mode
    would lock a serving account or a group out of the registry. Call before the rename.
    """
    os.chmod(path, base & ~current_umask())


def _atomic_local_write(path: Path, fill, if_absent: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        honour_umask(tmp)
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
    with s3_errors(uri, "PutObject"):
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
    with s3_errors(uri, "upload"):
        s3_client().upload_file(str(local_path), bucket, key)


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy ``uri`` to a local path atomically."""
    local_path = Path(local_path)
    if not is_s3(uri):
        upload_file(uri, str(local_path))
        return
    bucket, key = split_s3(uri)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=temp_prefix(), suffix=".part")
    os.close(fd)
    try:
        with s3_errors(uri, "download"):
            s3_client().download_file(bucket, key, tmp)
        honour_umask(tmp)
        os.replace(tmp, local_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
    with s3_errors(prefix, "ListObjectsV2"):
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            uris.extend(f"{S3_PREFIX}{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    return sorted(uris)


def is_link(uri: str) -> bool:
    """Whether a local path is a symbolic link (S3 has none)."""
    return not is_s3(uri) and Path(uri).is_symlink()


def links_under(prefix: str) -> list[str]:
    """Every symbolic link (to a file or a folder) under a local ``prefix``, not followed; [] on S3."""
    if is_s3(prefix) or not Path(prefix).is_dir():
        return []
    found = []
    for folder, dirnames, filenames in os.walk(prefix):  # os.walk does not descend into linked folders
        found.extend(str(Path(folder, name)) for name in [*dirnames, *filenames] if Path(folder, name).is_symlink())
    return sorted(found)


@dataclass(frozen=True)
class Entry:
    """One file or object: its URI, size in bytes and last modification (Unix time)."""

    uri: str
    bytes: int
    modified: float


def list_entries(prefix: str) -> list[Entry]:
    """``list_uris`` with each file's size and modification time (one listing on S3)."""
    if not is_s3(prefix):
        found = []
        for uri in list_uris(prefix):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                stat = Path(uri).stat()
                found.append(Entry(uri, stat.st_size, stat.st_mtime))
        return found
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    found = []
    with s3_errors(prefix, "ListObjectsV2"):
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            found.extend(
                Entry(f"{S3_PREFIX}{bucket}/{obj['Key']}", int(obj["Size"]), obj["LastModified"].timestamp())
                for obj in page.get("Contents", [])
            )
    return sorted(found, key=lambda entry: entry.uri)


def delete(uri: str) -> None:
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            Path(uri).unlink()
        return
    bucket, key = split_s3(uri)
    with s3_errors(uri, "DeleteObject"):
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


CAS_LOCK_WAIT = 60.0  # the lock is held for a read and a rename: a minute means a stuck or hostile holder


def _local_lock(path: Path) -> contextlib.AbstractContextManager:
    """The sidecar lock of a local compare-and-swap; bounded (locks.LockTimeout), said after a second.
    Its mode follows the umask, as every registry file does: a registry may be shared by a group."""
    from pneumo import locks

    path.parent.mkdir(parents=True, exist_ok=True)
    return locks.held(path.with_name(f".{path.stem}.lock"), f"another process is replacing {path}", CAS_LOCK_WAIT, mode=None)


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


def check_usable(uri: str) -> None:
    """ValueError (one line) unless ``uri`` is usable: a local folder writable (a probe file); an S3 bucket
    reachable (one HeadBucket: the endpoint answers, the bucket exists, the credentials work)."""
    if is_s3(uri):
        try:
            with s3_errors(uri, "HeadBucket"):
                s3_client().head_bucket(Bucket=split_s3(uri)[0])
        except Exception as error:  # S3Error, or botocore's missing-credentials errors
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{text}; check the bucket name, AWS credentials and AWS_ENDPOINT_URL") from None
        return
    path = Path(uri).expanduser()
    probe = path / f".pneumo-write-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"not writable ({error.strerror or error}); choose a folder you can write to") from None
