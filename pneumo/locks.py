"""Waiting for a file lock: bounded, and out loud.

An ``flock`` on a lock file: the kernel frees it however its holder dies. Anyone who can open the
file can hold it (a shared lock needs only read access), so no wait is unbounded: after
``SAY_AFTER`` seconds the waiter says what it waits for, and after its bound it gives up with
LockTimeout naming the file and how to find the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

SAY_AFTER = 1.0  # seconds: a lock held longer than a moment is worth a line

log = logging.getLogger(__name__)


class LockTimeout(RuntimeError):
    """A lock still held by another process after the wait's bound; the message names the file and the wait."""


@contextlib.contextmanager
def held(path: Path, what: str, wait: float, *, mode: Optional[int] = 0o600,
         say: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if absent), waiting at most ``wait`` seconds.

    ``what`` says what the holder is doing ("another pneumo is starting the server"); it is said
    (``say``, else a warning on this module's logger) once the wait passes SAY_AFTER. ``mode``:
    the file's permissions, also set on an existing file (None: as the umask makes it).
    """
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(handle, mode)  # an older pneumo created it 0644
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if not said and waited >= min(SAY_AFTER, wait):
                    (say or log.warning)(f"waiting for {path}: {what} (at most {wait:.0f} s)")
                    said = True
                if waited >= wait:
                    raise LockTimeout(f"{path} is still held after {wait:.0f} s ({what}); "
                                      f"`fuser -v {path}` names the holder") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(handle)  # releases the lock
