"""PyTorch for ``_device_memory``: where a tensor's storage lives, and moving it in place.

:class:`TorchFramework` is the :class:`~._device_memory.DeviceFramework` for PyTorch; its
device work goes through a :class:`TorchDeviceLayer`: :class:`CudaTorchLayer` on real CUDA,
a fake in the tests (which run everything on CPU tensors). The kernel asks
:func:`default_frameworks` for the frameworks it has imported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ._cuda import DeviceNumbering, numbering
from ._device_memory import DeviceFramework, Move

__all__ = [
    "CudaTorchLayer",
    "TorchDeviceLayer",
    "TorchFramework",
    "default_frameworks",
    "gpu_framework_imported",
]


class TorchDeviceLayer(Protocol):
    """Where a torch storage lives and how one is copied: real CUDA (:class:`CudaTorchLayer`)
    or a fake in tests."""

    def in_use(self) -> bool:
        """Whether any storage can be on a device (CUDA was initialised in the process)."""
        ...

    def device_of(self, storage: Any) -> int | None:
        """The physical device of ``storage``; None: host memory."""
        ...

    def copy(self, storage: Any, device: int | None) -> Any:
        """A copy of ``storage`` (an ``UntypedStorage``) on ``device`` (None: host memory)."""
        ...

    def release_cached(self) -> None: ...


class TorchFramework:
    """PyTorch: tensors, parameters (so modules), gradients, optimizer state.

    A move copies each storage once and points every tensor found on it at the copy
    (``tensor.data = ...`` on the same offset, size and stride): tensors keep their identity
    (a model and its optimizer still share each parameter, the optimizer's ``state`` is still
    keyed by them) and views stay views of their base, as ``module.to()`` keeps identity.
    Sparse, quantized, nested and meta tensors, and subclasses without a storage, are left
    where they are.
    """

    name = "torch"

    def __init__(self, torch: Any, layer: TorchDeviceLayer) -> None:
        self._torch = torch
        self._layer = layer

    def active(self) -> bool:
        return self._layer.in_use()

    def holds(self, obj: object) -> bool:
        return isinstance(obj, self._torch.Tensor)

    def parts(self, array: Any) -> Iterable[object]:
        parts = []
        if array.is_leaf and array.grad is not None:  # (.grad of a non-leaf warns)
            parts.append(array.grad)
        if array._base is not None:
            parts.append(array._base)
        return parts

    def _storage(self, tensor: Any) -> Any | None:
        torch = self._torch
        try:
            if tensor.layout is not torch.strided or tensor.is_quantized or tensor.is_meta:
                return None
            if getattr(tensor, "is_nested", False):
                return None
            return tensor.untyped_storage()
        except Exception:  # a subclass without storage (wrapper tensors)
            return None

    def device_of(self, array: Any) -> int | None:
        storage = self._storage(array)
        return None if storage is None else self._layer.device_of(storage)

    def _key(self, array: Any, storage: Any) -> tuple[str, int]:
        pointer = storage.data_ptr()
        # Empty storages all have address 0: not shared with anything.
        return (str(storage.device), pointer) if pointer else ("empty", id(array))

    def held(self, arrays: Sequence[Any]) -> dict[int, int]:
        seen: set[tuple[str, int]] = set()
        held: dict[int, int] = {}
        for array in arrays:
            storage = self._storage(array)
            if storage is None:
                continue
            device = self._layer.device_of(storage)
            key = self._key(array, storage)
            if device is None or key in seen:
                continue
            seen.add(key)
            held[device] = held.get(device, 0) + storage.nbytes()
        return held

    def move(self, moves: Sequence[tuple[Any, int | None]]) -> Move:
        torch = self._torch
        groups: dict[tuple[str, int], tuple[Any, int | None, list[Any]]] = {}
        for array, device in moves:
            storage = self._storage(array)
            if storage is None or self._layer.device_of(storage) == device:
                continue
            key = self._key(array, storage)
            # A storage is moved once, to where the first of its tensors goes.
            groups.setdefault(key, (storage, device, []))[2].append(array)
        moved = Move()
        with torch.no_grad():
            for storage, device, tensors in groups.values():
                copy = self._layer.copy(storage, device)
                for tensor in tensors:
                    window = torch.empty(0, dtype=tensor.dtype, device=copy.device)
                    window.set_(copy, tensor.storage_offset(), tensor.size(), tensor.stride())
                    tensor.data = window
                moved += Move(storage.nbytes(), len(tensors))
        return moved

    def release_cached(self) -> None:
        self._layer.release_cached()


class CudaTorchLayer:
    """Torch storages on real CUDA devices, numbered as this process's driver numbers them
    (``_cuda.numbering``). Host copies are pageable memory (``storage.cpu()``)."""

    def __init__(self, torch: Any, devices: DeviceNumbering | None = None) -> None:
        self._torch = torch
        self._numbering = devices

    def _devices(self) -> DeviceNumbering:
        return self._numbering if self._numbering is not None else numbering()

    def in_use(self) -> bool:
        return bool(self._torch.cuda.is_initialized())

    def device_of(self, storage: Any) -> int | None:
        device = storage.device
        if device.type != "cuda":
            return None
        return self._devices().physical(device.index or 0)

    def copy(self, storage: Any, device: int | None) -> Any:
        if device is None:
            return storage.cpu()
        ordinal = self._devices().ordinal(device)
        if ordinal is None:
            raise RuntimeError(f"GPU {device} is not visible to this process")
        return storage.cuda(ordinal)

    def release_cached(self) -> None:
        self._torch.cuda.empty_cache()


def gpu_framework_imported() -> bool:
    """Whether the kernel has imported a GPU framework whose memory it reports."""
    return "torch" in sys.modules


def default_frameworks() -> list[DeviceFramework]:
    """The frameworks the kernel has imported, on real CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "cuda"):
        return []
    return [TorchFramework(torch, CudaTorchLayer(torch))]
