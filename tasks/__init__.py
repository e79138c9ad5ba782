"""Thin Prefect tasks over the pneumo library: retries, caching, artifacts and logging."""
