"""GPU memory follows the binding: what the namespace holds on each device, evicted to host
memory when the scheduler needs the device, moved back onto the bound device before a cell.

After each cell the kernel reports the device memory its namespace holds
(:meth:`NamespaceDeviceMemory.held`, the ``device_memory`` of the execute reply). While nobody
else needs a device those objects stay there (a cache that costs nothing). When the scheduler
gives the device to another kernel, it sends ``nbcluster_evict_request``: :meth:`evict` moves
them to host memory *in place* (each tensor keeps its identity: a model, its optimizer and any
name bound to a parameter still share it; views stay views of their base) and releases the
framework's cached memory. Before the kernel's next cell with GPUs bound, :meth:`follow` moves
what was evicted, and whatever sits on a device not bound to that cell, onto the bound devices
(a device in the binding keeps its objects; the others map onto the bound devices in order).

Frameworks plug in through :class:`DeviceFramework`; PyTorch is the one implemented
(:class:`TorchFramework`), its device work behind a :class:`TorchDeviceLayer` so that tests run
the whole logic on CPU tensors with a fake layer; the real one is :class:`CudaTorchLayer`.

What is found is what is reachable from the namespace's names through containers (dicts,
lists, tuples, sets), objects' ``__dict__`` (modules of a network, optimizers, user classes),
and a tensor's ``.grad`` and view base, up to :data:`WALK_LIMIT` references. Not found, and so
neither counted nor moved: tensors held only by closures, ``__slots__``, C extensions or
objects past the limit; and the CUDA context itself (a few hundred MB on every device the
process has used), which lives as long as the process.
"""

from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._cuda import DeviceNumbering, numbering

__all__ = [
    "WALK_LIMIT",
    "CudaTorchLayer",
    "DeviceBusyError",
    "DeviceFramework",
    "Eviction",
    "HostCopies",
    "Move",
    "NamespaceDeviceMemory",
    "Restore",
    "TorchDeviceLayer",
    "TorchFramework",
    "default_frameworks",
    "describe_restore",
    "find_arrays",
    "gpu_framework_imported",
]

log = logging.getLogger(__name__)

#: At most this many references are followed when looking for device memory in the namespace.
WALK_LIMIT = 200_000

# Never looked into: values that cannot hold device memory, and code/modules (a module's
# globals are not the notebook's state).
_LEAVES = (
    str,
    bytes,
    bytearray,
    memoryview,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
    range,
    slice,
)


@dataclass(frozen=True)
class Move:
    """What one framework moved: the bytes of the storages moved (each once) and the objects
    (tensors) now on their new device."""

    bytes: int = 0
    objects: int = 0

    def __add__(self, other: Move) -> Move:
        return Move(self.bytes + other.bytes, self.objects + other.objects)


@dataclass(frozen=True)
class Eviction:
    """An eviction's result (the ``EvictReply``)."""

    freed_bytes: int
    moved_objects: int
    seconds: float


@dataclass(frozen=True)
class Restore:
    """What :meth:`NamespaceDeviceMemory.follow` moved onto the bound devices."""

    bytes: int
    objects: int
    seconds: float
    devices: tuple[int, ...]


class DeviceBusyError(RuntimeError):
    """An eviction asked for a device bound to the cell running now."""


class DeviceFramework(Protocol):
    """A framework whose arrays can hold device memory (PyTorch; CuPy and JAX could be added).

    Devices are the host's physical (NVML) indices; ``None`` is host memory.
    """

    name: str

    def active(self) -> bool:
        """Whether any of its arrays can be on a device at all (it has used CUDA)."""
        ...

    def holds(self, obj: object) -> bool:
        """Whether ``obj`` is one of its arrays."""
        ...

    def parts(self, array: Any) -> Iterable[object]:
        """Other objects an array keeps alive that may hold device memory (a tensor's
        ``.grad``, the base of a view)."""
        ...

    def device_of(self, array: Any) -> int | None:
        """The physical device ``array``'s memory is on; None: host memory (or not movable)."""
        ...

    def held(self, arrays: Sequence[Any]) -> dict[int, int]:
        """Bytes of device memory ``arrays`` hold per physical device, each buffer once."""
        ...

    def move(self, moves: Sequence[tuple[Any, int | None]]) -> Move:
        """Move each array to its device (None: host memory) in place, keeping its identity
        and the sharing between arrays (a buffer several arrays view is moved once)."""
        ...

    def release_cached(self) -> None:
        """Give the framework's cached, unused device memory back to the driver."""
        ...


# -- finding the arrays ------------------------------------------------------------------------


def find_arrays(
    roots: Iterable[object],
    frameworks: Sequence[DeviceFramework],
    limit: int = WALK_LIMIT,
) -> list[tuple[DeviceFramework, Any]]:
    """The arrays of ``frameworks`` reachable from ``roots`` (each once, in the order found),
    looking at most at ``limit`` references (a list of ten million numbers costs no more than
    the limit; see the module's docstring for what is looked into)."""
    found: list[tuple[DeviceFramework, Any]] = []
    seen: set[int] = set()
    queue: collections.deque[object] = collections.deque()
    budget = limit

    def push(values: Iterable[object]) -> None:
        nonlocal budget
        for value in itertools.islice(values, max(budget, 0)):
            budget -= 1
            if id(value) not in seen and not isinstance(value, _LEAVES):
                seen.add(id(value))
                queue.append(value)

    push(roots)
    while queue and budget > 0:
        obj = queue.popleft()
        owner = next((f for f in frameworks if f.holds(obj)), None)
        if owner is not None:
            found.append((owner, obj))
            push(owner.parts(obj))
            continue
        try:
            push(_children(obj))
        except Exception:  # changed while we looked, or an object that resists: skip it
            continue
    # What is still queued was reached within the budget: arrays among it count.
    for obj in queue:
        owner = next((f for f in frameworks if f.holds(obj)), None)
        if owner is not None:
            found.append((owner, obj))
    return found


def _children(obj: object) -> Iterator[object]:
    if isinstance(obj, dict):
        for key, value in dict.items(obj):
            yield key
            yield value
    elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
        yield from obj
    else:
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            yield from dict.values(attributes)


# -- the namespace's device memory -------------------------------------------------------------


class HostCopies(Protocol):
    """The tensors that arrived from another replica as host copies of its GPU memory
    (``_rebuild``): where each lived there, so that the first cell run here with GPUs moves
    them onto its bound devices."""

    def origin(self, array: Any) -> int | None: ...

    def forget(self, array: Any) -> None: ...


class NamespaceDeviceMemory:
    """The device memory held by the objects reachable from a namespace, and its moves.

    ``roots`` gives the namespace's values; ``frameworks`` the frameworks to look for (called
    each time: a framework counts once the cell has imported it). Thread-safe: evictions come
    on the control thread while cells run on the shell's.
    """

    def __init__(
        self,
        roots: Callable[[], Iterable[object]],
        frameworks: Callable[[], Sequence[DeviceFramework]],
        limit: int = WALK_LIMIT,
        *,
        host_copies: HostCopies | None = None,
    ) -> None:
        self._roots = roots
        self._frameworks = frameworks
        self._limit = limit
        self._host_copies = host_copies
        self._lock = threading.Lock()
        # id -> (a weak reference, the physical device it was evicted from)
        self._evicted: dict[int, tuple[weakref.ref[Any], int]] = {}
        # The devices bound to the cell running now (None: no cell runs with GPUs bound).
        self._running: tuple[int, ...] | None = None

    def _scan(self) -> list[tuple[DeviceFramework, Any]]:
        frameworks = [f for f in self._frameworks() if f.active()]
        if not frameworks:
            return []
        return find_arrays(self._roots(), frameworks, self._limit)

    def held(self) -> dict[int, int]:
        """Bytes held per physical device (devices holding nothing left out)."""
        with self._lock:
            arrays = self._scan()
        total: dict[int, int] = {}
        for framework, group in _by_framework(arrays):
            for device, size in framework.held(group).items():
                total[device] = total.get(device, 0) + size
        return {d: n for d, n in sorted(total.items()) if n > 0}

    def evicted_devices(self) -> tuple[int, ...]:
        """The devices whose objects are in host memory now, waiting for a bound cell."""
        with self._lock:
            entries = list(self._evicted.values())
        return tuple(sorted({d for ref, d in entries if ref() is not None}))

    def evict(self, devices: Collection[int]) -> Eviction:
        """Move what the namespace holds on ``devices`` (empty: every device except those bound
        to the running cell) to host memory and release the frameworks' cached memory.
        Raises :class:`DeviceBusyError` when one of ``devices`` is bound to the running cell."""
        start = time.perf_counter()
        with self._lock:
            running = self._running or ()
            busy = sorted(set(devices) & set(running))
            if busy:
                raise DeviceBusyError(
                    f"GPU {', '.join(map(str, busy))} is bound to the cell running now"
                )
            wanted = set(devices)
            moved = Move()
            touched: list[DeviceFramework] = []
            for framework, group in _by_framework(self._scan()):
                moves = []
                for array in group:
                    device = framework.device_of(array)
                    if device is None or device in running or (wanted and device not in wanted):
                        continue
                    moves.append((array, None))
                    self._remember(array, device)
                if moves:
                    moved += framework.move(moves)
                    touched.append(framework)
            for framework in touched:
                framework.release_cached()
        return Eviction(moved.bytes, moved.objects, time.perf_counter() - start)

    def _remember(self, array: Any, device: int) -> None:
        key = id(array)

        def forget(_: weakref.ref[Any]) -> None:
            self._evicted.pop(key, None)  # gone: nothing to move back

        try:
            ref = weakref.ref(array, forget)
        except TypeError:
            return  # cannot be followed: it stays in host memory
        self._evicted[key] = (ref, device)

    def begin_cell(self, devices: tuple[int, ...] | None) -> Restore | None:
        """A cell starts with ``devices`` bound (None or ``()``: none): from now on an eviction
        of them is refused; with devices, what was evicted and what sits on a device not bound
        to this cell is moved onto the bound devices first. Returns what was moved, if any."""
        with self._lock:
            self._running = devices or None
            if not devices:
                return None
            return self._follow(devices)

    def end_cell(self) -> None:
        """The running cell ended: its devices may be evicted again."""
        with self._lock:
            self._running = None

    def _follow(self, bound: tuple[int, ...]) -> Restore | None:
        start = time.perf_counter()
        arrays = self._scan()
        if not arrays and not self._evicted:
            return None
        planned: list[tuple[DeviceFramework, Any, int]] = []  # (framework, array, from device)
        for framework, array in arrays:
            device = framework.device_of(array)
            if device is None:
                entry = self._evicted.get(id(array))
                if entry is not None and entry[0]() is array:
                    device = entry[1]
                elif self._host_copies is not None:
                    # Arrived from the replica that ran earlier cells, where it was on a GPU.
                    device = self._host_copies.origin(array)
                if device is None:
                    continue  # host memory by the user's choice
            elif device in bound:
                continue
            planned.append((framework, array, device))
        self._evicted.clear()
        if not planned:
            return None
        target = _device_map({d for _, _, d in planned}, bound)
        moved = Move()
        for framework, group in _by_framework([(f, a) for f, a, _ in planned]):
            sources = {id(a): d for f, a, d in planned if f is framework}
            moved += framework.move([(a, target[sources[id(a)]]) for a in group])
        if self._host_copies is not None:
            for _, array, _ in planned:
                self._host_copies.forget(array)
        if moved.objects == 0:
            return None
        devices = tuple(sorted(set(target.values())))
        return Restore(moved.bytes, moved.objects, time.perf_counter() - start, devices)


def _device_map(sources: Collection[int], bound: tuple[int, ...]) -> dict[int, int]:
    """Where the objects of each source device go: a bound device stays; the others take the
    bound devices in order (round robin when there are more of them)."""
    others = sorted(d for d in sources if d not in bound)
    mapping = {d: d for d in sources if d in bound}
    for position, device in enumerate(others):
        mapping[device] = bound[position % len(bound)]
    return mapping


def _by_framework(
    arrays: Sequence[tuple[DeviceFramework, Any]],
) -> Iterator[tuple[DeviceFramework, list[Any]]]:
    groups: dict[int, tuple[DeviceFramework, list[Any]]] = {}
    for framework, array in arrays:
        groups.setdefault(id(framework), (framework, []))[1].append(array)
    yield from groups.values()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def describe_restore(restore: Restore) -> str:
    """The line a cell prints when its objects had to be moved onto its GPUs."""
    plural = "s" if len(restore.devices) > 1 else ""
    devices = ", ".join(map(str, restore.devices))
    return (
        f"[nbcluster] moved {_size(restore.bytes)} of tensors to GPU{plural} {devices} "
        f"in {restore.seconds:.1f} s\n"
    )


# -- PyTorch -----------------------------------------------------------------------------------


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
