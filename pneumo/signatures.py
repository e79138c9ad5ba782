"""Signed records: an HMAC-SHA256 over bytes that are read back later, with a key kept outside the workdir.

Prefect's result records can hold pickles and its JSON decoder builds any importable
class named in the record (``{"__class__": "subprocess.run", ...}`` runs a command), and
a record's own metadata names the serializer that reads it. So choosing a serializer does
not make a record safe to read: whoever can write the workdir could write the record. The
bytes are checked instead, before anything parses them, against a key the workdir never holds.

The key: ``PNEUMO_RESULTS_KEY`` (any secret of at least 32 characters; set it on every
machine of a cluster), else the file ``~/.config/pneumo/results.key``, created 0600 with
32 random bytes on first use and refused if others can read it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

KEY_ENV = "PNEUMO_RESULTS_KEY"
MAGIC = b"pneumo-signed-v1 "
MIN_KEY_CHARS = 32


class SignatureError(ValueError):
    """The bytes are not signed with this key (tampered, planted, or written under another key)."""


def key_path() -> Path:
    return Path.home() / ".config" / "pneumo" / "results.key"


def _create_key(path: Path) -> None:
    """Write a new random key to ``path`` (0600), unless another process just did."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key first: keep theirs
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def load_key() -> bytes:
    """The signing key: ``$PNEUMO_RESULTS_KEY``, else ``~/.config/pneumo/results.key`` (created on first use)."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if len(value.strip()) < MIN_KEY_CHARS:
            raise ValueError(f"{KEY_ENV} is too short: use at least {MIN_KEY_CHARS} random characters")
        return value.strip().encode()
    path = key_path()
    if not path.exists():
        _create_key(path)
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} must be a regular file (not a link or folder)")
    if info.st_mode & 0o077:
        raise ValueError(f"{path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 it")
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{path} holds a key shorter than {MIN_KEY_CHARS} characters")
    return key


def _mac(key: bytes, name: str, content: bytes) -> bytes:
    # The record's name is signed too, so a valid record moved under another name (another
    # cache key, so another task's inputs) is refused as well.
    message = b"pneumo-record\0" + name.encode() + b"\0" + content
    return hmac.new(key, message, hashlib.sha256).hexdigest().encode()


def sign(name: str, content: bytes, key: bytes) -> bytes:
    """``content`` prefixed with one line: the magic and the HMAC of ``name`` and ``content``."""
    return MAGIC + _mac(key, name, content) + b"\n" + content


def verify(name: str, data: bytes, key: bytes) -> bytes:
    """The content of signed ``data`` stored as ``name``; SignatureError if it was not signed so."""
    header, newline, content = data.partition(b"\n")
    if not newline or not header.startswith(MAGIC):
        raise SignatureError("not signed")
    if not hmac.compare_digest(header[len(MAGIC):], _mac(key, name, content)):
        raise SignatureError("signature does not match (changed, moved, or signed with another key)")
    return content
