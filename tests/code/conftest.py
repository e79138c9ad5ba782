"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from tests.helpers import write_shard_dataset


@pytest.fixture
def shard_dataset(tmp_path):
    """A manifest of 24 small images (one is not an image), its URI and a folder for shards."""
    return write_shard_dataset(tmp_path)
