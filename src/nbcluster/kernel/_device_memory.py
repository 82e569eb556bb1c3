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
(``_device_torch.TorchFramework``), its device work behind a ``TorchDeviceLayer`` so that tests
run the whole logic on CPU tensors with a fake layer; the real one is ``CudaTorchLayer``.

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
import threading
import time
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "WALK_LIMIT",
    "DeviceBusyError",
    "DeviceFramework",
    "Eviction",
    "HostCopies",
    "Move",
    "NamespaceDeviceMemory",
    "Restore",
    "describe_restore",
    "find_arrays",
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
