"""Cache policies: a task's cache key covers its inputs, its own source and the library code it runs."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Optional

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext


@dataclass
class LibrarySource(CachePolicy):
    """Hashes the source of the pneumo modules a task calls.

    TASK_SOURCE only sees the thin task body; without this, a change to the image
    recipe would be served from a stale cache.
    """

    modules: tuple[str, ...] = ()

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> Optional[str]:
        digest = hashlib.sha256()
        for name in self.modules:
            digest.update(inspect.getsource(importlib.import_module(name)).encode())
        return digest.hexdigest()


def cache_policy(*modules: str, ignore: tuple[str, ...] = ()) -> CachePolicy:
    """Inputs (but the ``ignore`` parameters) + task source + the source of the given pneumo modules."""
    inputs = INPUTS
    for name in ignore:
        inputs = inputs - name
    return inputs + TASK_SOURCE + LibrarySource(modules=tuple(modules))
