"""GPU memory per host device: capacity, memory kernels keep between cells, and evictions.

Part of the pure scheduler: :class:`._state.Scheduler` owns one :class:`VramLedger` and asks
it which devices to bind, whether a bound cell may start, and what to evict first. No I/O, no
clock.

Model (issue 12, "GPU memory follows the binding"):

* every host device has a **capacity** in bytes (what NVML reports, or the host's virtual
  default); a cell of a kernel that asks ``KERNEL_VRAM_GB`` commits ``vram_gb / gpus`` on each
  of its devices while it is bound, and is only bound to devices that have that much;
* after a cell, the replica that ran it reports what it still **holds** per device
  (``DeviceMemoryReported``): tensors left in the namespace. Held memory is a cache: it costs
  nothing while nobody else needs the device;
* a cell of replica ``(K, R)`` bound to devices ``D`` of host ``H`` **starts only when** no
  other holder (another kernel, or another replica of ``K``) holds memory on ``D`` and ``(K, R)``
  holds none on the devices of ``H`` outside ``D`` (its tensors move to host memory first and
  come back to ``D`` before the cell). Otherwise the binding is *parked*: its devices stay
  committed (nobody else can take them), one ``Evict`` goes to each holder (at most one in
  flight per device), and the cell starts (``BindGpus`` with ``evicted`` set) when the last
  ``EvictionFinished`` it waits for leaves those devices clean;
* a **failed** eviction (an error, a timeout, a replica that is gone or does not answer) leaves
  the holder's memory counted as held: if it is still held once the cell has nothing else to
  wait for, the cell is refused (``RefuseCell``, its devices released) rather than started on
  memory another kernel holds; devices whose eviction failed are chosen last afterwards. A
  holder whose replica stops holds nothing any more (its process took its memory along).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._actions import BindGpus, Evict
from ._events import EvictionFinished
from ._resources import Resources
from ._views import DeviceMemoryView, EvictionWait

__all__ = ["GIB", "VramLedger", "device_capacities", "vram_share"]

GIB = 1 << 30

#: Who holds device memory: ``(kernel_id, replica_id)``.
Holder = tuple[str, str]


def vram_share(request: Resources) -> int:
    """Bytes a cell of a kernel with this request commits on each of its GPUs."""
    if request.gpus <= 0 or request.vram_gb <= 0:
        return 0
    return math.ceil(request.vram_gb * GIB / request.gpus)


def device_capacities(
    spec: Resources, devices: tuple[int, ...], vram: tuple[int, ...]
) -> dict[int, int]:
    """Capacity in bytes of each device index: ``vram`` (in the order of ``devices``, or of
    ``0 .. spec.gpus - 1`` when ``devices`` is empty), else ``spec.vram_gb`` shared evenly."""
    order = devices or tuple(range(spec.gpus))
    if vram:
        if len(vram) != len(order) or min(vram) < 0:
            raise ValueError(f"{len(order)} GPUs need {len(order)} non-negative VRAM sizes")
        return dict(zip(order, vram, strict=True))
    each = int(spec.vram_gb * GIB) // max(spec.gpus, 1)
    return dict.fromkeys(order, each)


@dataclass(slots=True)
class _Parked:
    """A bound cell that waits for evictions before it may start."""

    term: int
    replica_id: str
    host: str
    devices: tuple[int, ...]
    waiting_on: set[int] = field(default_factory=set)
    evicted: set[int] = field(default_factory=set)
    freed_bytes: int = 0
    seconds: float = 0.0
    others: bool = False
    failed: str = ""


class VramLedger:
    """Capacity, holdings and evictions in flight, per host device; the parked cells."""

    def __init__(self) -> None:
        self._capacity: dict[str, dict[int, int]] = {}
        self._held: dict[str, dict[int, dict[Holder, int]]] = {}
        #: ``(host, device)`` → the holder an ``Evict`` in flight was sent to.
        self._evicting: dict[tuple[str, int], Holder] = {}
        #: ``(host, device, holder)`` whose last eviction failed (chosen last).
        self._stuck: set[tuple[str, int, Holder]] = set()
        self._parked: dict[str, _Parked] = {}

    # -- hosts ---------------------------------------------------------------------------------

    def set_host(self, host: str, capacities: dict[int, int]) -> None:
        self._capacity[host] = capacities
        held = self._held.get(host, {})
        for device in [d for d in held if d not in capacities]:
            del held[device]

    def remove_host(self, host: str) -> None:
        """The host is gone with its replicas' memory (parked cells there are unparked by
        the scheduler, which drops their bindings)."""
        self._capacity.pop(host, None)
        self._held.pop(host, None)
        for key in [k for k in self._evicting if k[0] == host]:
            del self._evicting[key]
        self._stuck = {s for s in self._stuck if s[0] != host}

    def largest(self, hosts: Iterable[str] | None = None) -> int:
        """The largest device capacity in the cluster, or among ``hosts`` (0: no GPU)."""
        names = self._capacity.keys() if hosts is None else hosts
        return max((c for name in names for c in self._capacity.get(name, {}).values()), default=0)

    def fits(self, host: str, free: Iterable[int], share: int, count: int) -> bool:
        """Whether ``count`` of these free devices have ``share`` bytes each."""
        if share == 0:
            return True
        caps = self._capacity.get(host, {})
        return sum(1 for d in free if caps.get(d, 0) >= share) >= count

    def choose(
        self, host: str, free: Iterable[int], count: int, holder: Holder, share: int
    ) -> tuple[int, ...]:
        """``count`` free devices that fit ``share``: those the holder's own memory is on
        first, then empty ones, then those held by others (least memory first), a device
        whose eviction failed last; by index among equals."""
        caps = self._capacity.get(host, {})
        held = self._held.get(host, {})

        def key(device: int) -> tuple[int, int, int, int]:
            holders = held.get(device, {})
            foreign = sum(b for h, b in holders.items() if h != holder)
            stuck = any((host, device, h) in self._stuck for h in holders if h != holder)
            return (int(stuck), 0 if holders.get(holder) else 1, foreign, device)

        fitting = [d for d in free if share == 0 or caps.get(d, 0) >= share]
        return tuple(sorted(sorted(fitting, key=key)[:count]))

    # -- holdings ------------------------------------------------------------------------------

    def report(self, host: str, holder: Holder, held: Mapping[int, int]) -> None:
        """What a replica holds after a cell: it replaces what it held before."""
        self.forget(host, holder)
        caps = self._capacity.get(host, {})
        devices = self._held.setdefault(host, {})
        for device, size in held.items():
            if device in caps and size > 0:
                devices.setdefault(device, {})[holder] = size

    def forget(self, host: str, holder: Holder) -> None:
        """The replica stopped (or reported afresh): it holds nothing any more."""
        for holders in self._held.get(host, {}).values():
            holders.pop(holder, None)
        self._stuck = {s for s in self._stuck if s[0] != host or s[2] != holder}

    # -- parking -------------------------------------------------------------------------------

    def gate(self, bind: BindGpus) -> list[Evict] | None:
        """None: the bound cell may start now. Else it is parked until the evictions it needs
        (these, and any already in flight on its devices) are finished."""
        if bind.term is None or not bind.device_indices:
            return None
        holder = (bind.kernel_id, bind.replica_id)
        needed = self._needed(bind.host, holder, bind.device_indices)
        if not needed:
            return None
        parked = _Parked(bind.term, bind.replica_id, bind.host, bind.device_indices)
        self._parked[bind.kernel_id] = parked
        return self._evict(bind.kernel_id, parked, needed)

    def parked(self, kernel_id: str) -> bool:
        return kernel_id in self._parked

    def unpark(self, kernel_id: str) -> None:
        self._parked.pop(kernel_id, None)

    def finished(
        self, event: EvictionFinished
    ) -> list[tuple[str, EvictionWait | str | list[Evict]]]:
        """Apply an eviction's outcome. For every parked cell it leaves with nothing to wait
        for: ``(kernel_id, outcome)``, the outcome being an :class:`EvictionWait` (start it),
        a reason (refuse it) or more evictions (it stays parked)."""
        holder = (event.kernel_id, event.replica_id)
        done = [
            key
            for key, who in self._evicting.items()
            if who == holder and key[1] in event.device_indices
        ]
        for host, device in done:
            del self._evicting[(host, device)]
            holders = self._held.get(host, {}).get(device, {})
            if event.ok:
                holders.pop(holder, None)
            elif holder in holders:
                self._stuck.add((host, device, holder))
        results: list[tuple[str, EvictionWait | str | list[Evict]]] = []
        for kernel_id, parked in list(self._parked.items()):
            hit = {d for h, d in done if h == parked.host} & parked.waiting_on
            if not hit:
                continue
            parked.waiting_on -= hit
            if event.ok:
                parked.evicted |= hit
                parked.freed_bytes += event.freed_bytes
                parked.seconds = max(parked.seconds, event.seconds)
            elif not parked.failed:
                devices = ", ".join(map(str, sorted(hit)))
                parked.failed = (
                    f"GPU {devices} of host {parked.host} is still held by kernel "
                    f"{event.kernel_id}: moving its memory away failed ({event.error or 'no reason given'})"
                )
            if not parked.waiting_on:
                results.append((kernel_id, self._resolve(kernel_id, parked)))
        return results

    def _resolve(self, kernel_id: str, parked: _Parked) -> EvictionWait | str | list[Evict]:
        needed = self._needed(parked.host, (kernel_id, parked.replica_id), parked.devices)
        if not needed:
            del self._parked[kernel_id]
            return EvictionWait(
                tuple(sorted(parked.evicted)), parked.freed_bytes, parked.seconds, parked.others
            )
        if parked.failed:
            del self._parked[kernel_id]
            return f"{parked.failed}. Run the cell again."
        return self._evict(kernel_id, parked, needed)

    def _needed(
        self, host: str, holder: Holder, devices: tuple[int, ...]
    ) -> dict[Holder, set[int]]:
        """Who must free which devices before ``holder`` runs on ``devices``."""
        needed: dict[Holder, set[int]] = {}
        for device, holders in self._held.get(host, {}).items():
            for who, size in holders.items():
                if size > 0 and (who != holder) == (device in devices):
                    needed.setdefault(who, set()).add(device)
        return needed

    def _evict(
        self, kernel_id: str, parked: _Parked, needed: dict[Holder, set[int]]
    ) -> list[Evict]:
        actions: list[Evict] = []
        for who, devices in sorted(needed.items()):
            own = who == (kernel_id, parked.replica_id)
            parked.others = parked.others or not own
            parked.waiting_on |= devices
            new = tuple(sorted(d for d in devices if (parked.host, d) not in self._evicting))
            if not new:
                continue  # an eviction of these devices is in flight already
            for device in new:
                self._evicting[(parked.host, device)] = who
            bound = ", ".join(map(str, parked.devices))
            reason = (
                f"the kernel's next cell runs on GPU {bound}"
                if own
                else f"kernel {kernel_id} needs GPU {', '.join(map(str, new))}"
            )
            actions.append(Evict(who[0], who[1], parked.host, new, reason))
        return actions

    def evict_for(self, host: str, devices: tuple[int, ...], whom: str) -> list[Evict]:
        """Best effort, nothing waits: free devices given to a batch job (``whom``)."""
        needed: dict[Holder, list[int]] = {}
        for device in devices:
            if (host, device) in self._evicting:
                continue
            for who, size in self._held.get(host, {}).get(device, {}).items():
                if size > 0:
                    needed.setdefault(who, []).append(device)
        actions = []
        for who, found in sorted(needed.items()):
            for device in found:
                self._evicting[(host, device)] = who
            actions.append(Evict(who[0], who[1], host, tuple(found), f"{whom} needs them"))
        return actions

    # -- views ---------------------------------------------------------------------------------

    def views(self, host: str, committed: Mapping[int, int]) -> tuple[DeviceMemoryView, ...]:
        held = self._held.get(host, {})
        return tuple(
            DeviceMemoryView(
                device=device,
                capacity=capacity,
                committed=committed.get(device, 0),
                held=tuple(sorted((who, size) for who, size in held.get(device, {}).items())),
                evicting=self._evicting.get((host, device)),
            )
            for device, capacity in sorted(self._capacity.get(host, {}).items())
        )

    @property
    def parked_cells(self) -> tuple[tuple[str, int], ...]:
        return tuple((k, p.term) for k, p in self._parked.items())

    @property
    def in_flight(self) -> tuple[tuple[str, int, Holder], ...]:
        return tuple((h, d, who) for (h, d), who in self._evicting.items())
