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
from typing import Iterable

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


class BadKey(ValueError):
    """The results key cannot be used; the message is one line: which key, what is wrong, the fix."""


def _file_key(path: Path) -> bytes:
    """The key held by ``path``, created (0600) if it does not exist; BadKey if it is not fit to sign with."""
    fix = f"remove it to have a new one made on the next run (cached results are recomputed once), or set {KEY_ENV}"
    try:
        if not path.exists() and not path.is_symlink():
            _create_key(path)
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise BadKey(f"results key {path} is a symbolic link, not a regular file: {fix}")
        if not stat.S_ISREG(info.st_mode):
            raise BadKey(f"results key {path} is not a regular file: {fix}")
        if info.st_mode & 0o077:
            raise BadKey(f"results key {path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 {path}")
        key = path.read_bytes().strip()
    except OSError as error:
        raise BadKey(f"results key {path} cannot be read or created ({error.strerror or error}): "
                     f"make {path.parent} yours and writable, or set {KEY_ENV}") from None
    if not key:
        raise BadKey(f"results key {path} is empty: {fix}")
    if len(key) < MIN_KEY_CHARS:
        raise BadKey(f"results key {path} is too short ({len(key)} characters, fewer than {MIN_KEY_CHARS}): {fix}")
    return key


def load_key() -> bytes:
    """The signing key: ``$PNEUMO_RESULTS_KEY``, else ``~/.config/pneumo/results.key`` (created on first use).

    BadKey (one line) for a key that cannot be trusted: too short, empty, a link, readable by others.
    """
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if len(value.strip()) < MIN_KEY_CHARS:
            raise BadKey(f"{KEY_ENV} (the results key) is too short ({len(value.strip())} characters, "
                         f"fewer than {MIN_KEY_CHARS}): set it to at least {MIN_KEY_CHARS} random characters "
                         f"(e.g. `openssl rand -hex 32`), or unset it to use {key_path()}")
        return value.strip().encode()
    return _file_key(key_path())


def key_problem() -> str | None:
    """What is wrong with the results key, in one line, or None when it can sign: checked before a run starts,
    because Prefect only logs a failed write of a result record and runs on uncached."""
    try:
        load_key()
    except BadKey as error:
        return str(error)
    return None


def _mac(key: bytes, name: str) -> "hmac.HMAC":
    # The record's name is signed too, so a valid record moved under another name (another
    # cache key, so another task's inputs) is refused as well.
    return hmac.new(key, b"pneumo-record\0" + name.encode() + b"\0", hashlib.sha256)


HEADER_BYTES = len(MAGIC) + hashlib.sha256().digest_size * 2 + 1  # the magic, the hex HMAC, a newline


def sign(name: str, content: bytes, key: bytes) -> bytes:
    """``content`` prefixed with one line: the magic and the HMAC of ``name`` and ``content``."""
    mac = _mac(key, name)
    mac.update(content)
    return MAGIC + mac.hexdigest().encode() + b"\n" + content


def verify(name: str, data: bytes, key: bytes) -> bytes:
    """The content of signed ``data`` stored as ``name``; SignatureError if it was not signed so."""
    return verify_stream(name, [data], key)


def verify_stream(name: str, chunks: Iterable[bytes], key: bytes) -> bytes:
    """``verify`` over the record's bytes as they are read (pneumo.storage.read_chunks): the HMAC is
    updated chunk by chunk, so a record is read once and its content joined once, after its header."""
    pieces = iter(chunks)
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= HEADER_BYTES:
            break
    header, first = head[:HEADER_BYTES], head[HEADER_BYTES:]
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC) or not header.endswith(b"\n"):
        raise SignatureError("not signed")
    mac = _mac(key, name)
    content = [first]
    mac.update(first)
    for piece in pieces:
        mac.update(piece)
        content.append(piece)
    if not hmac.compare_digest(header[len(MAGIC):-1], mac.hexdigest().encode()):
        raise SignatureError("signature does not match (changed, moved, or signed with another key)")
    return b"".join(content)
