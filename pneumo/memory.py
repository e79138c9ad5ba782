"""How much memory this process may take: physical RAM, its cgroup's limit and its address-space limit.

A server that sizes itself from RAM alone overcommits in a container (cgroup limit) or under
``ulimit -v`` / ``prlimit --as`` (RLIMIT_AS), where an allocation past the limit raises
``MemoryError`` long before RAM runs out.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import NamedTuple, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


class MemoryLimits(NamedTuple):
    ram: int  # physical memory, bytes
    cgroup: Optional[int]  # the tightest memory limit of this process's cgroup and its parents; None: none
    address_space: Optional[int]  # RLIMIT_AS minus the address space mapped now; None: unlimited

    @property
    def tightest(self) -> int:
        return min(v for v in self if v is not None)


def physical_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _limit_in(path: Path) -> Optional[int]:
    """A cgroup memory limit file's value; None for "max", a missing or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup path under the v2 hierarchy and under the v1 memory controller ("" if none)."""
    unified = memory = ""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return unified, memory
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            unified = path.strip("/")
        elif "memory" in controllers.split(","):
            memory = path.strip("/")
    return unified, memory


def cgroup_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """The tightest memory limit over this process's cgroup and its ancestors: cgroup v2
    ``memory.max`` or v1 ``memory.limit_in_bytes``; None when there is none ("max", or v1's
    "unlimited" 2^63 which no machine has). In a container the root is the container's own cgroup."""
    unified, memory = _own_cgroups(proc_cgroup)
    candidates = []
    for base, relative, name in ((root, unified, "memory.max"), (root / "memory", memory, "memory.limit_in_bytes")):
        parts = Path(relative).parts if relative else ()
        for depth in range(len(parts) + 1):  # the cgroup itself, then each parent up to the root
            candidates.append(base.joinpath(*parts[:depth], name))
    limits = [value for value in map(_limit_in, candidates) if value is not None and value < 2**62]
    return min(limits, default=None)


def mapped_bytes() -> int:
    """Address space this process has mapped now (VmSize), which RLIMIT_AS counts; 0 if unknown."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def address_space_left() -> Optional[int]:
    """RLIMIT_AS's soft limit minus what is mapped now; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - mapped_bytes(), 0)


def memory_limits(cgroup_root: Path = CGROUP_ROOT) -> MemoryLimits:
    return MemoryLimits(physical_ram(), cgroup_limit(cgroup_root), address_space_left())
