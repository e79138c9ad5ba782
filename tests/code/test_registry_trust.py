"""Issue 15 items 3-7 and 17: nothing read back from the registry is trusted.

A card edited after registration, a card that would fail requests, stray and broken version
folders, symbolic links, the history of alias moves, and the modes files are written with.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from pneumo import storage

from pneumo import registry
from pneumo.model import TinyNet


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet().state_dict()


@pytest.fixture
def umask():
    """Set the process umask for one test and give the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mask, mode):
    """Item 17: mkstemp's 0600 is not kept when the temporary is renamed into place."""
    umask(mask)
    root = str(tmp_path / "registry")
    version = registry.register(root, "m", _weights(0), {})
    registry.set_alias(root, "m", "latest", version)
    storage.write_json(str(tmp_path / "plain.json"), {"x": 1})
    storage.write_bytes(str(tmp_path / "once.bin"), b"x", if_absent=True)
    _, token = storage.read_with_token(str(tmp_path / "cas.json"))
    storage.compare_and_swap(str(tmp_path / "cas.json"), b"{}", token)
    storage.download_file(str(tmp_path / "plain.json"), tmp_path / "copy.json")
    written = [
        tmp_path / "registry" / "m" / version / "model.pt",
        tmp_path / "registry" / "m" / version / "card.json",
        tmp_path / "registry" / "m" / "aliases" / "latest.json",
        tmp_path / "plain.json", tmp_path / "once.bin", tmp_path / "cas.json", tmp_path / "copy.json",
    ]
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert modes == {path.name: oct(mode) for path in written}
