"""How much memory the server sizes itself for (issue 23 item 6): the tightest of physical RAM,
the cgroup's limit (v2 and v1, the process's cgroup and its parents) and RLIMIT_AS."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from pneumo.memory import MemoryLimits, cgroup_limit
from pneumo.serve import default_decode_memory

MB, GB = 2**20, 2**30


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_the_cgroup_limit_is_the_tightest_of_v2_v1_and_their_parents(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/system.slice/pneumo.service\n4:cpu,memory:/docker/abc")
    assert cgroup_limit(root, proc) is None  # no files at all: no limit

    write(root / "system.slice" / "pneumo.service" / "memory.max", "max")
    write(root / "system.slice" / "memory.max", str(3 * GB))  # a parent's limit holds its children too
    assert cgroup_limit(root, proc) == 3 * GB

    write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "none"
    assert cgroup_limit(root, proc) == 3 * GB
    write(root / "memory" / "memory.limit_in_bytes", str(1 * GB))
    assert cgroup_limit(root, proc) == 1 * GB

    write(proc, "0::/")  # in a container: its own cgroup is the root
    write(root / "memory.max", str(512 * MB))
    assert cgroup_limit(root, proc) == 512 * MB


@pytest.mark.parametrize("limits, budget", [
    (MemoryLimits(ram=24 * GB, cgroup=None, address_space=None), 2 * GB),  # a quarter of RAM, at most 2 GB
    (MemoryLimits(ram=24 * GB, cgroup=2 * GB, address_space=None), 512 * MB),  # a quarter of the cgroup's
    (MemoryLimits(ram=24 * GB, cgroup=400 * MB, address_space=None), 200 * MB),  # never over half of it
    (MemoryLimits(ram=24 * GB, cgroup=None, address_space=1 * GB), 512 * MB),  # half the address space left
    (MemoryLimits(ram=1 * GB, cgroup=None, address_space=None), 256 * MB),  # at least 256 MB
])
def test_the_default_decode_budget_is_set_by_the_tightest_limit(limits, budget):
    assert default_decode_memory(limits) == budget


@pytest.mark.slow  # a fresh interpreter: in `make test`, not `make test-fast`
def test_the_default_decode_budget_follows_an_address_space_limit():
    """Under `prlimit --as=1.5G` the budget was 2 GB (a quarter of this machine's RAM, capped):
    two decodes at once ran out of address space. Now at most half of what the limit leaves."""
    limit = int(1.5 * GB)
    code = "from pneumo.serve import default_decode_memory; print(default_decode_memory())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert run.returncode == 0, run.stderr
    budget = int(run.stdout)
    print(f"decode budget under RLIMIT_AS 1.5 GB: {budget // MB} MB")
    assert limit // 4 < budget < limit // 2  # half of what is left: the interpreter and its libraries are mapped
