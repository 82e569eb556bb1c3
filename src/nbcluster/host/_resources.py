"""What a host offers: CPUs, memory and GPUs (real ones through NVML, else virtual ones)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import psutil

from ..hostproto import GpuInfo, HostResources

__all__ = ["discover_nvml_gpus", "discover_resources", "virtual_gpus"]

log = logging.getLogger(__name__)

VIRTUAL_GPU_MEMORY_MB = 40 * 1024


def discover_nvml_gpus(devices: Sequence[int] | None = None) -> list[GpuInfo]:
    """Real GPUs visible through NVML, or ``[]`` when there is no driver or no device.

    ``devices`` restricts the result to those NVML indices (several host daemons on one machine
    each take a disjoint share).
    """
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency, but keep working without it
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            if devices is not None and index not in devices:
                continue
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_mb=int(memory.total) // (1024 * 1024),
                    virtual=False,
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def virtual_gpus(count: int, host_name: str) -> list[GpuInfo]:
    """``count`` virtual GPUs for a host without real ones (tests, laptops, simulations)."""
    return [
        GpuInfo(
            index=i,
            uuid=f"VGPU-{host_name}-{i}",
            name="nbcluster virtual GPU",
            memory_mb=VIRTUAL_GPU_MEMORY_MB,
            virtual=True,
        )
        for i in range(count)
    ]


def discover_resources(
    host_name: str,
    *,
    virtual_gpu_count: int | None,
    default_virtual_gpus: int = 8,
    gpu_devices: Sequence[int] | None = None,
    cpus: int | None = None,
    memory_mb: int | None = None,
    pool: str | None = None,
) -> HostResources:
    """Resources a host daemon reports in its hello.

    ``virtual_gpu_count`` forces that many virtual GPUs; otherwise real GPUs are used when NVML
    finds any, and ``default_virtual_gpus`` virtual ones when it finds none.
    """
    if virtual_gpu_count is not None:
        gpus = virtual_gpus(virtual_gpu_count, host_name)
    else:
        gpus = discover_nvml_gpus(gpu_devices) or virtual_gpus(default_virtual_gpus, host_name)
    return HostResources(
        cpus=cpus if cpus is not None else (os.cpu_count() or 1),
        memory_mb=memory_mb if memory_mb is not None else psutil.virtual_memory().total // 2**20,
        gpus=gpus,
        pool=pool,
    )
