"""Thin Prefect tasks over the pneumo library: retries, caching, artifacts and logging."""

# Registers the signed result storage block type in every process that runs a task (a
# Dask worker loads the block by name, which needs its class).
from tasks import result_storage  # noqa: E402,F401
