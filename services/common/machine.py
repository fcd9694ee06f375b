"""The device and memory a process reports in its ComponentHealth, and the CPU cores it may use."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
from inference.v1 import info_pb2

MIB = 1024.0 * 1024.0


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (avx2, avx512_vnni, amx_bf16, ...);
    empty where it cannot be read. Read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def device_info(device: str) -> info_pb2.DeviceInfo:
    """The accelerator behind `device` ("cuda", "cuda:1", "cpu", "mps"; "" means cpu)."""
    if device.startswith("cuda"):
        import torch  # only the tiers that hold a model on a GPU have torch to report it

        return info_pb2.DeviceInfo(
            type="cuda", name=torch.cuda.get_device_name(device), count=torch.cuda.device_count()
        )
    return info_pb2.DeviceInfo(type=device or "cpu", name="", count=1)


def memory_info(device: str = "") -> info_pb2.MemoryInfo:
    """This process's resident memory, the machine's, and the GPU's when `device` is one."""
    system = psutil.virtual_memory()
    memory = info_pb2.MemoryInfo(
        process_rss_mib=psutil.Process().memory_info().rss / MIB,
        system_total_mib=system.total / MIB,
        system_available_mib=system.available / MIB,
    )
    if device.startswith("cuda"):
        import torch

        memory.gpu_allocated_mib = torch.cuda.memory_allocated(device) / MIB
        memory.gpu_total_mib = torch.cuda.get_device_properties(device).total_memory / MIB
    return memory


CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Cores:
    """How many CPU cores this process may use, and why (for the start-up log)."""

    count: int
    reason: str


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in cores of the cgroup this process sees at `root` (v2 cpu.max, else v1
    cpu.cfs_quota_us / cpu.cfs_period_us); None where there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cores(affinity: set[int] | None = None, cgroup_root: Path = CGROUP_ROOT) -> Cores:
    """The cores this process may use: its CPU affinity (else os.cpu_count()), capped by its cgroup's
    CPU quota rounded down, at least 1. The default thread count of every model runtime."""
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    if affinity:
        count, reason = len(affinity), "affinity"
    else:
        count, reason = os.cpu_count() or 1, "the machine's count"
    quota = _cgroup_quota(cgroup_root)
    # A quota below the affinity would leave threads waiting for their turn: oversubscription.
    if quota is not None and int(quota) < count:
        count, reason = max(1, int(quota)), "cgroup quota"
    return Cores(count, f"{count} {'core' if count == 1 else 'cores'} from {reason}")


def runtime_threads(configured: int, setting: str) -> Cores:
    """The threads a model runtime gets: `configured` when set (the flag `setting`), else usable_cores()."""
    if configured > 0:
        return Cores(configured, f"{configured} from {setting}")
    return usable_cores()
