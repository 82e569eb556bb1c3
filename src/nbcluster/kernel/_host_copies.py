"""GPU memory in state sync: the executor ships a GPU tensor's storage as host bytes, and the
other replicas keep it in host memory (they have no GPU bound) until they run a cell with GPUs,
when ``_device_memory`` moves it onto the bound device.

Pickling side (``_pickling``'s tensor reducer): :func:`device_origin`, :class:`HostCopy`
(pickled as its bytes: torch's own pickle of a storage names its address, so the digest would
change at every capture although the values did not). Loading side (``_rebuild``'s tensor
rebuilder): :class:`HostHolder`, and the record of which tensors arrived this way
(:func:`note_host_copy`, read by the kernel through :class:`SyncedHostCopies`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = [
    "HostCopy",
    "HostHolder",
    "SyncedHostCopies",
    "device_origin",
    "forget_host_copy",
    "host_bytes",
    "host_copy_origin",
    "note_host_copy",
]


def device_origin(storage: Any) -> int | None:
    """The physical GPU a torch storage lives on (None: host memory, or a device that is not
    CUDA: those are pickled torch's own way)."""
    device = storage.device
    if device.type != "cuda":
        return None
    from ._cuda import numbering

    ordinal = device.index or 0
    physical = numbering().physical(ordinal)
    return ordinal if physical is None else physical


def host_bytes(torch: Any, storage: Any) -> bytes:
    host = storage.cpu()
    if host.nbytes() == 0:
        return b""
    return bytes(torch.empty(0, dtype=torch.uint8).set_(host).numpy().tobytes())


class HostCopy:
    """A GPU storage's bytes, copied to the host at capture; pickled as those bytes (not by
    torch, whose pickles name the storage's address: the digest would change at every
    capture although the values did not)."""

    __slots__ = ("data", "origin")

    def __init__(self, origin: int, data: bytes) -> None:
        self.origin = origin
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_host_copy, (self.origin, self.data)


class HostHolder:
    """A GPU storage's bytes as they arrive on another replica: a CPU ``uint8`` tensor over
    them and the physical GPU it lived on at the executor (see ``_pickling``)."""

    __slots__ = ("origin", "tensor")

    def __init__(self, tensor: Any, origin: int) -> None:
        self.tensor = tensor
        self.origin = origin


def _rebuild_host_copy(origin: int, data: bytes) -> HostHolder:
    import torch

    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
    return HostHolder(tensor.to(torch.uint8), origin)


#: id(tensor) -> (weak reference, physical GPU it lived on at the executor), for the tensors
#: that arrived as host copies of GPU memory: a replica holds them in host memory (it has no
#: GPU bound) until it runs a cell with GPUs, when ``_device_memory`` moves them there.
_HOST_COPIES: dict[int, tuple[weakref.ref[Any], int]] = {}
_HOST_COPIES_LOCK = threading.Lock()


def note_host_copy(tensor: Any, origin: int) -> None:
    key = id(tensor)

    def forget(_: weakref.ref[Any]) -> None:
        with _HOST_COPIES_LOCK:
            _HOST_COPIES.pop(key, None)

    with _HOST_COPIES_LOCK:
        _HOST_COPIES[key] = (weakref.ref(tensor, forget), origin)


def host_copy_origin(tensor: object) -> int | None:
    """The physical GPU a tensor lived on at the executor, if it arrived here as a host copy
    of GPU memory and has not been moved to a device since (``forget_host_copy``)."""
    with _HOST_COPIES_LOCK:
        entry = _HOST_COPIES.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]


def forget_host_copy(tensor: object) -> None:
    """The tensor was moved onto a device: it is an ordinary tensor from now on."""
    with _HOST_COPIES_LOCK:
        entry = _HOST_COPIES.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            del _HOST_COPIES[id(tensor)]


class SyncedHostCopies:
    """The kernel's view of the record, for ``_device_memory`` (its ``HostCopies``)."""

    def origin(self, array: Any) -> int | None:
        return host_copy_origin(array)

    def forget(self, array: Any) -> None:
        forget_host_copy(array)
