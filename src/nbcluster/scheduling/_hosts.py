"""The scheduler's hosts: registry, free devices, draining, and the indexes placement searches.

:class:`._state.Scheduler` owns one :class:`HostIndex` and applies the host events through it
(``HostAdded``, ``HostResourcesChanged``, ``HostDrainRequested``, ``HostRemoved``);
``_binding`` and ``_jobs`` tell it when devices or claims change, and ``_placement``,
``_binding`` and ``_waiting`` ask it where a request fits. Every change to a host's free
devices, claims or draining goes through here so that the indexes stay exact.

Draining: a host drains when an operator asks (``drain_requested``) or when its spec shrank
below the devices still bound or held by jobs. A draining host takes no new claim and no new
binding (it leaves both indexes), but what it already runs stays until it ends.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from ._confinement import ANYWHERE, Confinement
from ._events import HostAdded, HostResourcesChanged
from ._model import Host, SchedulerConfig
from ._resources import Resources
from ._views import HostView
from ._vram import GIB, VramLedger, device_capacities, vram_share

__all__ = ["HostIndex"]

_FIELD_WORDS = {
    "gpus": "GPUs",
    "millicpus": "millicpus",
    "memory_mb": "MB of memory",
    "vram_gb": "GB of VRAM",
}


class HostIndex:
    """The hosts by name (``hosts``, read-only to others), and two indexes over them."""

    def __init__(self, config: SchedulerConfig, vram: VramLedger) -> None:
        self._config = config
        #: Each host's device memory is registered and dropped with the host.
        self._vram = vram
        self.hosts: dict[str, Host] = {}
        # Least-loaded placement: per spec GPU count, a heap of (load key, version) with
        # lazy deletion; every placeable host has exactly one live entry.
        self._heaps: dict[int, list[tuple[tuple[float, int, str], int]]] = {}
        # Binding and migration: non-draining hosts by number of free GPU devices.
        self.by_free: dict[int, dict[str, None]] = {}
        #: The largest spec of each resource, per pool (key None: every host).
        self._max_spec: dict[str | None, Resources] = {}
        # Heap entry versions come from one counter, so that a host removed and added again
        # never matches an entry left from its earlier life.
        self._versions = 0

    # ----------------------------------------------------------------- host events

    def update(self, event: HostAdded | HostResourcesChanged) -> None:
        """Register a host, or apply a registered host's new spec, devices and pool (it
        drains if now too small): either event does either."""
        host = self.hosts.get(event.name)
        if host is None:
            self._add(event)
        else:
            self._change(host, event)

    def _add(self, event: HostAdded | HostResourcesChanged) -> None:
        devices = _devices(event.spec, event.gpu_devices)
        vram = device_capacities(event.spec, event.gpu_devices, event.device_vram)
        host = Host(event.name, event.spec, devices, set(devices), pool=event.pool)
        self.hosts[event.name] = host
        self._vram.set_host(event.name, vram)
        self._max_spec.clear()
        self.reindex(host)

    def _change(self, host: Host, event: HostAdded | HostResourcesChanged) -> None:
        devices = _devices(event.spec, event.gpu_devices)
        self._vram.set_host(
            event.name, device_capacities(event.spec, event.gpu_devices, event.device_vram)
        )
        self.unindex_free(host)
        host.spec = event.spec
        host.devices = devices
        host.pool = event.pool
        self._max_spec.clear()
        self.refresh_free(host)
        self.reindex(host)

    def drain(self, host: Host, draining: bool) -> None:
        """An operator's ``HostDrainRequested``: drain ``host``, or undrain it."""
        self.unindex_free(host)
        host.drain_requested = draining
        self.refresh_free(host)
        self.reindex(host)

    def remove(self, name: str) -> Host | None:
        """Forget a host and its device memory; the caller settles its claims and jobs."""
        host = self.hosts.pop(name, None)
        if host is None:
            return None
        self.unindex_free(host)
        host.version = -1  # kills its heap entry
        self._max_spec.clear()
        self._vram.remove_host(name)
        return host

    # ----------------------------------------------------------------- devices

    def commit(self, host: Host, kernel_id: str, devices: tuple[int, ...]) -> None:
        """Bind ``devices`` of ``host`` to a cell (or the life) of ``kernel_id``."""
        self.unindex_free(host)
        host.free.difference_update(devices)
        host.bound[kernel_id] = devices
        self.index_free(host)

    def uncommit(self, host: Host, kernel_id: str) -> None:
        """Free the devices ``kernel_id`` has bound on ``host``."""
        del host.bound[kernel_id]
        self.unindex_free(host)
        self.refresh_free(host)
        self.reindex(host)

    def refresh_free(self, host: Host) -> None:
        """Recompute free devices and draining after the spec or the bindings changed."""
        used = {d for devices in (*host.bound.values(), *host.jobs.values()) for d in devices}
        host.free = set(host.devices) - used
        host.draining = host.drain_requested or not used <= set(host.devices)

    # ----------------------------------------------------------------- placement

    def most_free(self) -> int:
        """The most free devices any non-draining host has."""
        return max(self.by_free, default=0)

    def can_place(self, host: Host, request: Resources, where: Confinement = ANYWHERE) -> bool:
        """Whether ``host`` takes one more claim of ``request`` (only where ``where`` admits)."""
        if not where.admits(host.name, host.pool):
            return False
        if host.draining or not request.fits(host.spec):
            return False
        return self.ratio(host.pending + request, host.spec) <= self._config.max_subscription_ratio

    def ratio(self, pending: Resources, spec: Resources) -> float:
        """The largest per-resource ``pending / spec / replicas_per_kernel``."""
        worst = 0.0
        capacity = spec.fields()
        for name, value in pending.fields().items():
            if value <= 0:
                continue
            if capacity[name] <= 0:
                return float("inf")
            worst = max(worst, value / capacity[name] / self._config.replicas_per_kernel)
        return worst

    def least_loaded(
        self,
        request: Resources,
        count: int,
        exclude: Iterable[str],
        where: Confinement = ANYWHERE,
    ) -> list[Host]:
        """Up to ``count`` distinct placeable hosts (that ``where`` admits), least
        GPU-subscribed first."""
        excluded = set(exclude)
        found: list[tuple[tuple[float, int, str], Host]] = []
        for gpus, heap in self._heaps.items():
            if gpus < request.gpus:
                continue
            popped: list[tuple[tuple[float, int, str], int]] = []
            eligible = 0
            while heap and eligible < count:
                entry = heapq.heappop(heap)
                host = self.hosts.get(entry[0][2])
                if host is None or host.version != entry[1]:
                    continue  # stale
                popped.append(entry)
                if host.name not in excluded and self.can_place(host, request, where):
                    found.append((entry[0], host))
                    eligible += 1
            for entry in popped:
                heapq.heappush(heap, entry)
            if len(heap) > 64 + 4 * len(self.hosts):
                self._compact(gpus)
        found.sort(key=lambda f: f[0])
        return [host for _, host in found[:count]]

    def free_host(
        self, request: Resources, exclude: Iterable[str], where: Confinement = ANYWHERE
    ) -> Host | None:
        """A placeable host (that ``where`` admits) with at least ``request.gpus`` free devices,
        most free first."""
        excluded = set(exclude)
        for free in sorted(self.by_free, reverse=True):
            if free < request.gpus:
                break
            for name in self.by_free[free]:
                host = self.hosts[name]
                if (
                    name not in excluded
                    and self.can_place(host, request, where)
                    and self._vram.fits(name, host.free, vram_share(request), request.gpus)
                ):
                    return host
        return None

    def too_big(self, request: Resources, where: Confinement = ANYWHERE) -> str | None:
        """Why no host (that ``where`` admits) could ever hold ``request``; None: one could,
        or, confined to named hosts, none of them has registered yet (hosts still to come
        are not judged)."""
        names = [h.name for h in self.hosts.values() if where.admits(h.name, h.pool)]
        if not names:
            return None if where.hosts is not None else f"no host is{where}"
        # Only a pool's largest spec is kept: named hosts are few and rarely asked for.
        biggest = self._max_spec.get(where.pool) if where.hosts is None else None
        if biggest is None:
            specs = [self.hosts[name].spec for name in names]
            biggest = Resources(
                max(s.gpus for s in specs),
                max(s.millicpus for s in specs),
                max(s.memory_mb for s in specs),
                max(s.vram_gb for s in specs),
            )
            if where.hosts is None:
                self._max_spec[where.pool] = biggest
        largest = biggest.fields()
        for name, value in request.fields().items():
            if value > largest[name] + (1e-9 if name == "vram_gb" else 0):
                word = _FIELD_WORDS[name]
                return f"requests {value:g} {word}; the largest host{where} has {largest[name]:g}"
        share = vram_share(request)
        device = self._vram.largest(None if where == ANYWHERE else names)
        if share > device:
            return (
                f"requests {share / GIB:.3g} GB of VRAM per GPU; the largest GPU{where} has "
                f"{device / GIB:.3g} GB"
            )
        return None

    # ----------------------------------------------------------------- indexes

    def reindex(self, host: Host) -> None:
        """Re-file ``host`` after its load, free devices or draining changed."""
        self._versions += 1
        host.version = self._versions
        if not host.draining:
            heap = self._heaps.setdefault(host.spec.gpus, [])
            heapq.heappush(heap, (host.load_key(), host.version))
        self.unindex_free(host)
        self.index_free(host)

    def _compact(self, gpus: int) -> None:
        heap = [
            (h.load_key(), h.version)
            for h in self.hosts.values()
            if h.spec.gpus == gpus and not h.draining
        ]
        heapq.heapify(heap)
        self._heaps[gpus] = heap

    def index_free(self, host: Host) -> None:
        if not host.draining:
            host.free_bucket = len(host.free)
            self.by_free.setdefault(host.free_bucket, {})[host.name] = None

    def unindex_free(self, host: Host) -> None:
        if host.free_bucket is None:
            return
        names = self.by_free[host.free_bucket]
        del names[host.name]
        if not names:
            del self.by_free[host.free_bucket]
        host.free_bucket = None

    def view(self, h: Host) -> HostView:
        return HostView(
            name=h.name,
            spec=h.spec,
            gpu_devices=h.devices,
            pending=h.pending,
            bound=tuple(h.bound.items()),
            replicas=tuple(h.replicas),
            draining=h.draining,
            subscription_ratio=self.ratio(h.pending, h.spec),
            jobs=tuple(h.jobs.items()),
            pool=h.pool,
        )


def _devices(spec: Resources, devices: tuple[int, ...]) -> tuple[int, ...]:
    chosen = devices or tuple(range(spec.gpus))
    if len(chosen) != spec.gpus or len(set(chosen)) != len(chosen):
        raise ValueError(f"a host with {spec.gpus} GPUs needs {spec.gpus} distinct device indices")
    return tuple(sorted(chosen))
