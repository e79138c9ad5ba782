"""Fault tests run flows against the session's real, temporary Prefect API server."""

import pytest


@pytest.fixture(autouse=True)
def _prefect(prefect_server):
    """Every fault test talks to the session's Prefect server."""
