"""Replica claims and GPU bindings: what a kernel holds on its hosts, and committing GPUs.

:class:`._state.Scheduler` owns one :class:`Binder`; it calls it to place and drop replicas'
claims, to bind a cell (or a ``reservation`` kernel's life) and to release it, and
``_waiting`` calls :meth:`Binder.try_bind` and :meth:`Binder.may_bind` to serve waiting
cells. A placed replica holds its kernel's request as a *pending* claim on its host; a binding
commits concrete devices on one replica's host. A cell whose devices hold another replica's
memory is *parked* behind evictions (``_vram``) before its ``BindGpus`` goes out.

Migration on execution (NotebookOS ``FindReadyReplica``): when no replica's host can commit a
cell's GPUs but another host can, the replica's claim moves there at once and ``Migrate`` is
followed by ``BindGpus`` on the new host.
"""

from __future__ import annotations

from ._actions import Action, BindGpus, Migrate, ReleaseGpus
from ._hosts import HostIndex
from ._model import Host, Kernel, SchedulerConfig
from ._views import Binding
from ._vram import VramLedger, vram_share

__all__ = ["Binder"]


class Binder:
    """Claims and bindings of the kernels, kept in step with :class:`HostIndex`."""

    def __init__(self, config: SchedulerConfig, index: HostIndex, vram: VramLedger) -> None:
        self._config = config
        self._index = index
        self._vram = vram

    # ----------------------------------------------------------------- claims

    def add_replica(self, kernel: Kernel, replica_id: str, host: Host) -> str:
        kernel.replicas[replica_id] = host.name
        host.replicas[(kernel.kernel_id, replica_id)] = None
        host.pending = host.pending + kernel.request
        self._index.reindex(host)
        return replica_id

    def new_replica(self, kernel: Kernel, host: Host) -> str:
        """Place a new replica of ``kernel`` (named by the config) on ``host``."""
        return self.add_replica(kernel, kernel.new_replica_id(self._config.new_replica_id), host)

    def remove_claim(self, kernel: Kernel, replica_id: str, host: Host) -> None:
        del kernel.replicas[replica_id]
        kernel.starting.discard(replica_id)
        del host.replicas[(kernel.kernel_id, replica_id)]
        host.pending = host.pending - kernel.request
        self._vram.forget(host.name, (kernel.kernel_id, replica_id))
        self._index.reindex(host)

    def move(self, kernel: Kernel, replica_id: str, source: Host, target: Host) -> Migrate:
        """Move a replica's claim from ``source`` to ``target`` under a new replica id."""
        self.remove_claim(kernel, replica_id, source)
        new_id = self.new_replica(kernel, target)
        return Migrate(kernel.kernel_id, replica_id, source.name, target.name, new_id)

    # ----------------------------------------------------------------- binding

    def try_bind(
        self, kernel: Kernel, term: int, preferred: str | None, gpus: int | None = None
    ) -> list[Action] | None:
        """Bind the cell's GPUs (``gpus``, default the kernel's request) on a replica's host,
        else migrate, else None (wait).

        NotebookOS ``FindReadyReplica``: the previous executor if its host can commit now,
        else the replica whose host has the most idle GPUs."""
        gpus = kernel.request.gpus if gpus is None else gpus
        hosts = self._index.hosts
        usable = [
            (rid, hosts[h]) for rid, h in kernel.replicas.items() if rid not in kernel.starting
        ]
        share = vram_share(kernel.request)
        ready = [
            (rid, h)
            for rid, h in usable
            if not h.draining
            and len(h.free) >= gpus
            and self._vram.fits(h.name, h.free, share, gpus)
        ]
        if gpus == 0 and not ready:
            ready = usable
        if ready:
            chosen = next((r for r in ready if r[0] == preferred), None)
            if chosen is None:
                chosen = max(ready, key=lambda r: len(r[1].free))
            devices = () if gpus == 0 else None
            return self.gate(self.bind(kernel, term, chosen[0], chosen[1], devices))
        # A lone replica has no peer to catch up from: it waits for its own host.
        if not kernel.policy.migrates or len(usable) < 2:
            return None
        target = self._index.free_host(
            kernel.request, exclude=set(kernel.replicas.values()), where=kernel.confinement
        )
        if target is None:
            return None
        ids = [rid for rid, _ in usable]
        replica_id = preferred if preferred in ids else ids[0]
        source = hosts[kernel.replicas[replica_id]]
        migrate = self.move(kernel, replica_id, source, target)
        return [migrate, *self.gate(self.bind(kernel, term, migrate.new_replica_id, target))]

    def may_bind(self, kernel: Kernel, gpus: int) -> bool:
        """False only when :meth:`try_bind` would surely return None now: no usable replica's
        host has ``gpus`` idle devices and the kernel cannot migrate (its policy does not, or
        it has fewer than two usable replicas)."""
        if gpus == 0:
            return True
        usable = 0
        for replica_id, name in kernel.replicas.items():
            if replica_id in kernel.starting:
                continue
            usable += 1
            host = self._index.hosts[name]
            if not host.draining and len(host.free) >= gpus:
                return True
        return kernel.policy.migrates and usable >= 2

    def gate(self, bind: BindGpus) -> list[Action]:
        """The binding, or the evictions its cell waits for (parked, see ``_vram``)."""
        evictions = self._vram.gate(bind)
        return [bind] if evictions is None else list(evictions)

    def bind(
        self,
        kernel: Kernel,
        term: int | None,
        replica_id: str,
        host: Host,
        devices: tuple[int, ...] | None = None,
    ) -> BindGpus:
        """Commit ``devices`` (default: the lowest free ones the request needs) on ``host``."""
        if devices is None:
            holder = (kernel.kernel_id, replica_id)
            share = vram_share(kernel.request)
            devices = self._vram.choose(host.name, host.free, kernel.request.gpus, holder, share)
        if devices:
            self._index.commit(host, kernel.kernel_id, devices)
        kernel.binding = Binding(term, replica_id, host.name, devices)
        return BindGpus(kernel.kernel_id, term, replica_id, host.name, devices)

    def release(self, kernel: Kernel) -> ReleaseGpus:
        b = kernel.binding
        assert b is not None
        kernel.binding = None
        self._vram.unpark(kernel.kernel_id)
        host = self._index.hosts.get(b.host)
        if host is not None and kernel.kernel_id in host.bound:
            self._index.uncommit(host, kernel.kernel_id)
        return ReleaseGpus(kernel.kernel_id, b.term, b.replica_id, b.host, b.device_indices)
