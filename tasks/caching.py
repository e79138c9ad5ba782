"""Cache policies: a task's cache key covers its inputs, its own source and the source of the whole pneumo library."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

import pneumo


@functools.cache
def library_digest() -> str:
    """The digest of the installed pneumo package, read once per process."""
    return pneumo.source_digest()


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
