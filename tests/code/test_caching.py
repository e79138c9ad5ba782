"""Cache keys: every cached task's key changes with any pneumo module's source, and never with the pool."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pneumo
from pneumo import pool as pneumo_pool
from pneumo.config import SplitConfig, TransformConfig, seed_transform
from pneumo.shard_files import ShardSpec
from tasks import caching
from tests.helpers import cache_key, cached_tasks

REPO = Path(__file__).resolve().parents[2]


def test_the_library_digest_covers_every_module_of_pneumo(tmp_path):
    copy = tmp_path / "pneumo"
    shutil.copytree(pneumo.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = pneumo.source_digest(copy)
    assert base == caching.library_digest()  # the key is of the package the tasks run

    modules = sorted(copy.glob("*.py"))
    assert len(modules) >= 20
    for path in modules:
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        assert pneumo.source_digest(copy) != base, f"a change to pneumo/{path.name} keeps every cache key"
        path.write_bytes(original)
    assert pneumo.source_digest(copy) == base
    (copy / "added.py").write_text("X = 1\n")
    assert pneumo.source_digest(copy) != base, "a new pneumo module keeps every cache key"


def test_every_cached_task_key_changes_with_the_library_source(monkeypatch):
    found = cached_tasks()
    assert {"download", "write-shard", "write-shard-index", "train-evaluate-register"} <= {t.name for t in found}
    before = {task.name: cache_key(task, x=1) for task in found}
    monkeypatch.setattr(caching, "library_digest", lambda: "0" * 64)
    after = {task.name: cache_key(task, x=1) for task in found}
    assert [name for name in before if before[name] == after[name]] == []


# Run in a fresh interpreter against a copy of the repository: the keys of every cached task.
KEYS_SCRIPT = """
import json, sys
import pneumo
assert pneumo.__file__.startswith(sys.argv[1]), pneumo.__file__
from tests.helpers import cache_key, cached_tasks
print(json.dumps({task.name: cache_key(task, x=1) for task in cached_tasks()}))
"""


def keys_in(root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    run = subprocess.run(
        [sys.executable, "-c", KEYS_SCRIPT, str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh processes on a copy of the repository
def test_changing_a_pneumo_module_changes_every_task_key_in_a_fresh_process(tmp_path):
    """End to end, as a user meets it: edit a library file, run again, no stale cache hit.

    pneumo/sizes.py (which the transform uses) and pneumo/storage.py (which writes every
    shard) were each missing from hand-kept module lists.
    """
    root = tmp_path / "repo"
    for folder in ("pneumo", "tasks", "tests"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "data", "fixtures"))
    before = keys_in(root)
    assert "write-shard" in before
    for module in ("sizes.py", "storage.py"):
        changed = root / "pneumo" / module
        original = changed.read_text()
        changed.write_text(original + "\n# a change the cache must see\n")
        after = keys_in(root)
        changed.write_text(original)
        assert after.keys() == before.keys()
        assert [name for name in before if before[name] == after[name]] == [], f"pneumo/{module} changed"


def test_where_the_pixels_are_computed_is_not_in_the_key():
    spec = ShardSpec(
        root="/data", manifest_digest="d" * 64, split_config=SplitConfig(), transform=seed_transform(size=(8, 8)),
        split="train", number=0, start=0, stop=0, records=(), uri="/work/shards/train-0000.h5",
    )
    other = spec.model_copy(update={"number": 1, "uri": "/work/shards/train-0001.h5"})
    with_pool = [task for task in cached_tasks() if "pool" in inspect.signature(task.fn).parameters]
    assert {"write-shard", "score-chunk"} <= {task.name for task in with_pool}
    with pneumo_pool.ProcessPool(1) as process_pool:
        for task in with_pool:
            first = next(iter(inspect.signature(task.fn).parameters))
            alone = cache_key(task, **{first: spec, "pool": None})
            assert alone == cache_key(task, **{first: spec, "pool": process_pool}), task.name
            assert alone != cache_key(task, **{first: other, "pool": None}), task.name
