"""What a host reports it can offer (NVML replaced by fakes: no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from nbcluster.host import _resources, discover_nvml_gpus, discover_resources, virtual_gpus
from nbcluster.hostproto import GpuInfo


def test_virtual_gpus() -> None:
    gpus = virtual_gpus(3, "node-a")
    assert [g.index for g in gpus] == [0, 1, 2]
    assert [g.uuid for g in gpus] == ["VGPU-node-a-0", "VGPU-node-a-1", "VGPU-node-a-2"]
    assert all(g.virtual for g in gpus)
    assert all(g.memory_mb == 40 * 1024 for g in gpus)
    assert virtual_gpus(0, "x") == []


def test_forced_virtual_gpus_and_explicit_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_resources, "discover_nvml_gpus", _must_not_be_called)
    resources = discover_resources("h", virtual_gpu_count=2, cpus=3, memory_mb=1000)
    assert resources.cpus == 3
    assert resources.memory_mb == 1000
    assert [g.uuid for g in resources.gpus] == ["VGPU-h-0", "VGPU-h-1"]


def _must_not_be_called(*args: Any) -> list[GpuInfo]:
    raise AssertionError("NVML must not be asked when virtual GPUs are forced")


def test_real_gpus_win_over_default_virtual_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    real = [GpuInfo(index=0, uuid="GPU-x", name="H100", memory_mb=81_000, virtual=False)]
    seen: list[Any] = []

    def fake(devices: Any = None) -> list[GpuInfo]:
        seen.append(devices)
        return real

    monkeypatch.setattr(_resources, "discover_nvml_gpus", fake)
    resources = discover_resources("h", virtual_gpu_count=None, gpu_devices=[0])
    assert resources.gpus == real
    assert seen == [[0]]
    assert resources.cpus >= 1
    assert resources.memory_mb > 0


def test_default_virtual_gpus_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_resources, "discover_nvml_gpus", lambda devices=None: [])
    resources = discover_resources("h", virtual_gpu_count=None, default_virtual_gpus=4)
    assert len(resources.gpus) == 4
    assert all(g.virtual for g in resources.gpus)


def test_nvml_init_failure_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert discover_nvml_gpus() == []


def test_nvml_devices_are_read_and_filtered(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 3)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: b"NVIDIA H100" if h else "A100")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: f"GPU-{h}".encode())
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(total=(h + 1) * 2**30)
    )
    gpus = discover_nvml_gpus([0, 2])
    assert gpus == [
        GpuInfo(index=0, uuid="GPU-0", name="A100", memory_mb=1024, virtual=False),
        GpuInfo(index=2, uuid="GPU-2", name="NVIDIA H100", memory_mb=3072, virtual=False),
    ]
    assert calls == ["init", "shutdown"]
    assert [g.index for g in discover_nvml_gpus()] == [0, 1, 2]
