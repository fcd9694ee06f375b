"""The device and memory a process reports in its ComponentHealth."""

from __future__ import annotations

import psutil
from inference.v1 import info_pb2

MIB = 1024.0 * 1024.0


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
