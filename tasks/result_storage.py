"""Where Prefect persists task results for a workdir: ``{workdir}/prefect-results``, every record signed.

Prefect reads a cached record on every cache hit and lets the record itself choose how it is
decoded (pickle, or JSON that can build any importable class), so a record planted in the
workdir ran its code in the next run. This storage block signs what Prefect writes and
checks it before Prefect parses anything (pneumo/signatures.py holds the key, outside the
workdir). A record that fails the check is refused with a warning; Prefect then treats the
cache as empty (``ResultStore.exists`` is False) and the task runs again, overwriting it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.filesystems import WritableFileSystem
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL
from pydantic import Field

from pneumo import signatures, storage

# Prefect names records by their cache key (a hex digest); anything else is refused
# rather than joined onto the folder.
RECORD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # fullmatch: re.match with $ lets "abc\n" through
# Records hold task results: references and rows (a 1,000-image scoring chunk is well under 1 MB).
MAX_RECORD_BYTES = 64 * 2**20


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pneumo.results")


class SignedResultStorage(WritableFileSystem):
    """Prefect result storage under ``root`` (a local folder or an ``s3://`` URI), signed with an HMAC.

    S3 goes through pneumo.storage (boto3 with the standard AWS settings), so no credential
    is stored in the block on the Prefect server.
    """

    _block_type_name = "Pneumo Signed Result Storage"
    _block_type_slug = "pneumo-signed-result-storage"

    root: str = Field(description="Folder or s3:// URI the records are written under.")

    def _uri(self, path: str) -> str:
        if not RECORD_NAME.fullmatch(path) or path in (".", ".."):
            raise ValueError(f"refusing result record name {path!r}: not a plain file name")
        return storage.join(self.root, path)

    # Prefect calls these with ``_sync=True`` (its async-dispatch flag); they are sync anyway.
    def read_path(self, path: str, _sync: Any = None) -> bytes:
        uri = self._uri(path)
        key = signatures.load_key()
        try:
            # A regular file under MAX_RECORD_BYTES only, checked before it is read (a planted FIFO
            # would hang the run, a 2 GB file fill its memory), then signed-checked as it streams.
            chunks = storage.read_chunks(uri, max_bytes=MAX_RECORD_BYTES)
            return signatures.verify_stream(path, chunks, key)
        except (signatures.SignatureError, storage.Unreadable) as error:
            _logger().warning("refused cached result %s (%s); its task runs again and rewrites it", uri, error)
            raise

    def write_path(self, path: str, content: bytes, _sync: Any = None) -> str:
        uri = self._uri(path)
        storage.write_bytes(uri, signatures.sign(path, content, signatures.load_key()))
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)


_SAVED: dict[tuple[str, str], SignedResultStorage] = {}  # (root, API URL): the block saved there


def signed_storage_block(root: str) -> SignedResultStorage:
    """Save the signed result storage block for the folder or S3 prefix ``root`` and return it, saved.

    Task subprocesses (Dask, a worker's flow run) resolve result storage from the Prefect API,
    and Prefect refuses an unsaved block, so the block is saved there. It holds the location
    only: no credential, no key. The saved block itself goes to the tasks, not its slug: a slug
    is loaded by Prefect's block registry, which first imports every installed Prefect
    collection (prefect-aws and prefect-dask: ~1.2 s of CPU in each run's process).
    """
    # A key that cannot sign fails the run here, in one line, not each record's commit in the log only.
    signatures.load_key()
    # Saved once per location and API in a process: a save is ~0.26 s of CPU (client and server), asked per task.
    api = PREFECT_API_URL.value() or ""
    if (root, api) not in _SAVED:
        # Named after the location, so runs on the same workdir share one block and its cache.
        name = "pneumo-results-" + hashlib.sha256(root.encode()).hexdigest()[:16]
        block = SignedResultStorage(root=root)
        block.save(name, overwrite=True)
        _SAVED[(root, api)] = block
    return _SAVED[(root, api)]
