"""Flow tests run against a real, temporary Prefect API server on a subset of the real data."""

import pytest


@pytest.fixture(autouse=True)
def _prefect(prefect_server):
    """Every flow test talks to the session's Prefect server."""
