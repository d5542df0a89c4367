"""How many CPUs this process may use, for sizing torch's and onnxruntime's intra-op thread pools.

Both libraries size their pools from the host's cores: in a container limited to 2 CPUs on a 64-core node each
would start 64 threads that the CPU quota then throttles. The count here is the smaller of

- the CPUs the process may run on (``os.sched_getaffinity``: the cpuset of a container, ``taskset``), and
- the CPU bandwidth quota of its cgroup and every ancestor cgroup: cgroup v2 ``cpu.max`` (``QUOTA PERIOD`` or
  ``max PERIOD``), cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). A Kubernetes CPU
  limit of 2 is a quota of 200000 per 100000 us.

A fractional quota is rounded down (at least 1), as uber-go/automaxprocs does: threads beyond the quota's whole
CPUs run into the quota's throttling at every period. Sources: the Linux kernel's cgroup v2 documentation
("cpu.max") and cgroup v1 CFS bandwidth control documentation (``sched-bwc``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

#: Where cgroupfs is mounted, and the file naming this process's cgroups.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


class CgroupFormatError(ValueError):
    """A cgroup CPU file that does not read as the kernel writes it (the message names the file and its text)."""


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use.

    Attributes:
        cpus: whole CPUs to size thread pools with, at least 1.
        affinity_cpus: CPUs in the process's affinity mask (``os.sched_getaffinity``).
        quota_cpus: the cgroup quota in CPUs (quota / period, smallest along the cgroup's ancestry), or None
            when no quota applies.
        source: one line saying where ``cpus`` comes from, for the log and ``GetModelInfo``.
    """

    cpus: int
    affinity_cpus: int
    quota_cpus: float | None
    source: str


def parse_cpu_max(text: str, name: str = "cpu.max") -> float | None:
    """cgroup v2 ``cpu.max`` (``"200000 100000"``, ``"max 100000"``, or ``"max"``) in CPUs; None: no limit.

    Raises:
        CgroupFormatError: anything else.
    """
    fields = text.split()
    try:
        if fields and fields[0] == "max" and len(fields) <= 2:
            return None
        if len(fields) == 2:
            quota, period = int(fields[0]), int(fields[1])
            if quota > 0 and period > 0:
                return quota / period
    except ValueError:
        pass
    raise CgroupFormatError(f"{name}: expected 'QUOTA PERIOD' or 'max PERIOD', got {text.strip()!r}")


def parse_cfs(quota_text: str, period_text: str, name: str = "cpu.cfs_quota_us") -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` in CPUs; None for quota -1 (no limit).

    Raises:
        CgroupFormatError: not integers, or a period that is not positive.
    """
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        raise CgroupFormatError(f"{name}: expected integers, got {quota_text.strip()!r} and "
                                f"{period_text.strip()!r}") from None
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        raise CgroupFormatError(f"{name}: quota {quota} per period {period} us is not a CPU limit")
    return quota / period


def _ancestry(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount/a/b/c``, ``mount/a/b``, ``mount/a``, ``mount``: the cgroup and its ancestors that exist.

    In a container with its own cgroup namespace the path in ``/proc/self/cgroup`` is ``/`` and the mount is the
    container's cgroup; without one, the path is the host's and may not exist under the mount (then only the
    mount itself counts).
    """
    parts = [p for p in cgroup_path.strip().split("/") if p]
    folders = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def cgroup_quota_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroups in CPUs (the smallest found along v2 and v1 hierarchies and their
    ancestors), or None when there is none or cgroupfs cannot be read.

    Args:
        root: where cgroupfs is mounted; v2 (unified) there or in ``root/unified`` (hybrid), v1 controllers in
            ``root/cpu``, ``root/cpu,cpuacct``.
        proc_cgroup: the ``/proc/PID/cgroup`` file: ``0::/path`` (v2) and ``N:cpu,cpuacct:/path`` (v1) lines.
    Raises:
        CgroupFormatError: a quota file that exists but is malformed.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if not path:
            continue
        if controllers == "":                                   # cgroup v2
            mounts = [root] if (root / "cgroup.controllers").is_file() else [root / "unified"]
            for folder in (f for mount in mounts for f in _ancestry(mount, path)):
                file = folder / "cpu.max"
                if file.is_file():
                    limits.append(parse_cpu_max(file.read_text(), str(file)))
        elif "cpu" in controllers.split(","):                   # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                folders = _ancestry(mount, path)
                if folders:
                    break
            for folder in folders:
                quota, period = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
                if quota.is_file() and period.is_file():
                    limits.append(parse_cfs(quota.read_text(), period.read_text(), str(quota)))
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP,
               affinity: set[int] | None = None) -> CpuBudget:
    """The CPUs this process may use: the affinity mask's size, lowered to the cgroup quota rounded down (at
    least 1). ``affinity`` None: ``os.sched_getaffinity(0)`` (``os.cpu_count()`` where that does not exist).

    Raises:
        CgroupFormatError: a malformed cgroup quota file.
    """
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    affinity_cpus = max(1, len(affinity))
    quota = cgroup_quota_cpus(root, proc_cgroup)
    if quota is not None and max(1, math.floor(quota)) < affinity_cpus:
        cpus = max(1, math.floor(quota))
        source = f"cgroup CPU quota {quota:g} CPUs (affinity {affinity_cpus} CPUs)"
    else:
        cpus = affinity_cpus
        quota_text = "no cgroup CPU quota" if quota is None else f"cgroup CPU quota {quota:g} CPUs"
        source = f"CPU affinity {affinity_cpus} CPUs ({quota_text})"
    return CpuBudget(cpus=cpus, affinity_cpus=affinity_cpus, quota_cpus=quota, source=source)
