"""pneumo: chest X-rays to an ultra-light pneumonia classifier. No Prefect in here."""

from __future__ import annotations

import hashlib
from pathlib import Path

__version__ = "0.1.0"

PACKAGE = Path(__file__).parent


def source_digest(package: Path = PACKAGE) -> str:
    """sha256 over the name, size and bytes of every .py file under ``package`` (default: pneumo).

    The one digest of the library's source: task cache keys (tasks/caching.py) and a card's
    ``code_version`` both use it.
    """
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version() -> str:
    """The package version plus the first 12 digits of ``source_digest``: which code made a model."""
    return f"{__version__}+{source_digest()[:12]}"
