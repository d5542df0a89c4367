"""The CPU budget (nst_server.cpus): affinity and cgroup v2/v1 CPU quotas, read from sample cgroup trees written
in tmp_path as the kernel lays them out (a container with its own cgroup namespace, a Kubernetes pod seen from
the host, cgroup v1, the hybrid layout of this machine)."""

from __future__ import annotations

import os

import pytest

from nst_server.cpus import CgroupFormatError, cgroup_quota_cpus, cpu_budget, parse_cfs, parse_cpu_max

SIXTY_FOUR = set(range(64))


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(tmp_path, proc_line: str, files: dict[str, str], unified: str = ""):
    root = tmp_path / "cgroup"
    _write(root / unified / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for relative, text in files.items():
        _write(root / unified / relative, text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line)
    return root, proc


def test_parse_cpu_max():
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("50000 100000") == 0.5
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("max") is None
    for bad in ("", "two 100000", "200000", "0 100000", "100000 0", "1 2 3"):
        with pytest.raises(CgroupFormatError, match="cpu.max"):
            parse_cpu_max(bad)


def test_parse_cfs():
    assert parse_cfs("150000\n", "100000\n") == 1.5
    assert parse_cfs("-1\n", "100000\n") is None
    with pytest.raises(CgroupFormatError, match="integers"):
        parse_cfs("lots", "100000")
    with pytest.raises(CgroupFormatError, match="not a CPU limit"):
        parse_cfs("0", "100000")


def test_v2_container_namespace_limit_of_two_on_a_64_core_node(tmp_path):
    """A pod with limits.cpu 2 in its own cgroup namespace: /proc/self/cgroup says 0::/ and cpu.max is at the
    mount's root."""
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    budget = cpu_budget(root, proc, affinity=SIXTY_FOUR)
    assert (budget.cpus, budget.affinity_cpus, budget.quota_cpus) == (2, 64, 2.0)
    assert "cgroup CPU quota 2 CPUs" in budget.source


def test_v2_smallest_quota_along_the_ancestry_rounded_down(tmp_path):
    """Seen from the host: the container's cgroup has no quota, its pod's has 2.5 CPUs, the parent 4: 2 threads."""
    root, proc = _v2(tmp_path, "0::/kubepods.slice/pod1/ctr\n", {
        "kubepods.slice/cpu.max": "400000 100000\n",
        "kubepods.slice/pod1/cpu.max": "250000 100000\n",
        "kubepods.slice/pod1/ctr/cpu.max": "max 100000\n",
    })
    assert cgroup_quota_cpus(root, proc) == 2.5
    assert cpu_budget(root, proc, affinity=SIXTY_FOUR).cpus == 2


def test_v2_hybrid_layout_under_unified(tmp_path):
    root, proc = _v2(tmp_path, "0::/job\n", {"job/cpu.max": "300000 100000\n"}, unified="unified")
    assert cpu_budget(root, proc, affinity=SIXTY_FOUR).cpus == 3


def test_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "150000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    budget = cpu_budget(root, proc, affinity=SIXTY_FOUR)
    assert (budget.cpus, budget.quota_cpus) == (1, 1.5)


def test_v1_host_path_missing_under_the_mount_uses_the_mounts_root(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, the mount is the container's."""
    root = tmp_path / "cgroup"
    _write(root / "cpu" / "cpu.cfs_quota_us", "400000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("3:cpu:/docker/0123456789abcdef\n")
    assert cpu_budget(root, proc, affinity=SIXTY_FOUR).cpus == 4


def test_no_quota_uses_the_affinity_and_small_quotas_give_one_thread(tmp_path):
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    budget = cpu_budget(root, proc, affinity={0, 1, 2})
    assert (budget.cpus, budget.quota_cpus) == (3, None)
    assert budget.source == "CPU affinity 3 CPUs (no cgroup CPU quota)"
    root, proc = _v2(tmp_path / "half", "0::/\n", {"cpu.max": "50000 100000\n"})
    assert cpu_budget(root, proc, affinity=SIXTY_FOUR).cpus == 1
    root, proc = _v2(tmp_path / "wide", "0::/\n", {"cpu.max": "800000 100000\n"})
    assert cpu_budget(root, proc, affinity={0, 1}).cpus == 2        # the affinity is the smaller


def test_malformed_file_is_named(tmp_path):
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": "unlimited\n"})
    with pytest.raises(CgroupFormatError, match=r"cpu\.max.*'unlimited'"):
        cpu_budget(root, proc, affinity=SIXTY_FOUR)


def test_no_cgroupfs_at_all(tmp_path):
    assert cgroup_quota_cpus(tmp_path / "none", tmp_path / "no_proc_file") is None
    assert cpu_budget(tmp_path / "none", tmp_path / "no_proc_file", affinity={0}).cpus == 1


def test_this_process():
    """On this machine: never more than the affinity mask allows."""
    budget = cpu_budget()
    assert 1 <= budget.cpus <= len(os.sched_getaffinity(0)) == budget.affinity_cpus
