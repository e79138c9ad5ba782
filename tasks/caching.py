"""Cache policies: a task's cache key covers its inputs, its own source and the source of the whole pneumo library."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

import pneumo

PACKAGE = Path(pneumo.__file__).parent


def source_digest(package: Path) -> str:
    """sha256 over the name and bytes of every .py file under ``package``."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def library_digest() -> str:
    """The digest of the installed pneumo package, read once per process."""
    return source_digest(PACKAGE)


@dataclass
class LibrarySource(CachePolicy):
    """Hashes the source of every pneumo module.

    TASK_SOURCE only sees the thin task body. Lists of the modules each task reaches were
    kept by hand and went stale (one left out the size module its transform uses); the
    whole library costs one read per process and cannot miss one.
    """

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> Optional[str]:
        return library_digest()


def cache_policy(*, ignore: tuple[str, ...] = ()) -> CachePolicy:
    """Inputs (but the ``ignore`` parameters) + task source + the source of the pneumo library."""
    inputs = INPUTS
    for name in ignore:
        inputs = inputs - name
    return inputs + TASK_SOURCE + LibrarySource()
