"""Flow tests run against a real, temporary Prefect API server on a subset of the real data."""

import pytest

from tests.helpers import task_states  # noqa: F401  (re-exported for the flow tests)


@pytest.fixture(autouse=True)
def _prefect(prefect_server):
    """Every flow test talks to the session's Prefect server."""
