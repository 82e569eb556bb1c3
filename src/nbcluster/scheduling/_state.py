"""The scheduler: events in, the actions the gateway must carry out out.

The gateway owns one :class:`Scheduler` and feeds it every relevant fact as an event
(``_events``); :meth:`Scheduler.handle` updates the accounting and returns the actions
(``_actions``) the gateway must carry out. Nothing here does I/O or reads a clock, so a
simulator or a unit test can drive the same code. Callers read state only through the
frozen views (``hosts``, ``kernels``, ``summary()``).

Model (NotebookOS §2.6, §3.4): every placed replica holds its kernel's request as a
*pending* claim on its host, counted against the host's subscription cap
(``pending / spec / replicas_per_kernel ≤ max_subscription_ratio`` for GPUs, CPU, memory
and VRAM). GPUs are *committed* (bound to concrete device indices) only while a replica
executes a cell, or for the kernel's life under ``reservation``. CPU, memory and VRAM are
accounted as pending claims only.

Migration: when a cell's replicas' hosts cannot commit its GPUs but another host can, the
scheduler moves the replica's claim to that host at once and returns ``Migrate`` followed by
``BindGpus`` on the new host. The gateway then starts the new replica (same replica id),
lets it catch up, retires the old one, and runs the cell there. If the migration fails the
gateway reports ``ReplicaStopped`` for that replica (releasing claim and binding) and,
to restore the replica count, ``ReplicaRequested``.

This module dispatches the events and keeps the kernels; the parts it delegates to, each
handed the state it needs: ``_hosts`` (hosts, free devices, draining, placement indexes),
``_placement`` (where replicas go and may migrate to), ``_binding`` (claims and GPU
bindings), ``_waiting`` (the queue of cells waiting for GPUs), ``_jobs`` (batch jobs' GPUs
and users' quotas) and ``_vram`` (GPU memory and evictions, issue 12). Their records are in
``_model``. Every event that may free GPUs ends with :meth:`Scheduler._retry_waiting`, the
one place the queue is served (``test_scheduler_waiting`` replaces it with a reference).
"""

from __future__ import annotations

from collections.abc import Mapping

from ._actions import (
    Action,
    BindGpus,
    CancelWait,
    MigrationRefused,
    PlaceReplicas,
    RefuseCell,
    RejectKernel,
    ReleaseGpus,
    WaitForGpus,
)
from ._binding import Binder
from ._confinement import Confinement
from ._events import (
    DeviceMemoryReported,
    Event,
    EvictionFinished,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostDrainRequested,
    HostRemoved,
    HostResourcesChanged,
    JobGpusReleased,
    JobGpusRequested,
    KernelAdopted,
    KernelRequested,
    KernelStopped,
    MigrationRequested,
    ReplicaAdopted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
    UserQuotaSet,
)
from ._hosts import HostIndex
from ._jobs import JobLedger, UserQuotas
from ._model import Kernel, SchedulerConfig
from ._placement import (
    kernel_hosts,
    migration_target,
    replica_host,
    scale_out,
    waiting_scale_out,
)
from ._policies import policy_named
from ._views import ClusterSummary, DeviceMemoryView, HostView, KernelView
from ._vram import VramLedger, vram_share
from ._waiting import WaitingQueue

__all__ = ["Scheduler"]


class Scheduler:
    """Events in (:meth:`handle`), actions out; attributes are read-only to callers."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self._config = config or SchedulerConfig()
        self._kernels: dict[str, Kernel] = {}
        self._vram = VramLedger()
        self._index = HostIndex(self._config, self._vram)
        self._binder = Binder(self._config, self._index, self._vram)
        self._queue = WaitingQueue()
        self._jobs = JobLedger(self._index, self._vram)
        self._quotas = UserQuotas(self._kernels, self._jobs)

    # ----------------------------------------------------------------- views

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def hosts(self) -> Mapping[str, HostView]:
        return {name: self._index.view(h) for name, h in self._index.hosts.items()}

    @property
    def kernels(self) -> Mapping[str, KernelView]:
        return {k.kernel_id: k.view() for k in self._kernels.values()}

    def kernel(self, kernel_id: str) -> KernelView | None:
        """One kernel's view (``kernels`` builds every one)."""
        k = self._kernels.get(kernel_id)
        return None if k is None else k.view()

    def host(self, name: str) -> HostView | None:
        """One host's view (``hosts`` builds every one)."""
        h = self._index.hosts.get(name)
        return None if h is None else self._index.view(h)

    @property
    def waiting(self) -> tuple[tuple[str, int], ...]:
        """Cells waiting for GPUs, ``(kernel_id, term)``, in queue order."""
        return self._queue.order

    def summary(self) -> ClusterSummary:
        hosts = self._index.hosts.values()
        return ClusterSummary(
            hosts=len(hosts),
            gpu_capacity=sum(h.spec.gpus for h in hosts),
            committed_gpus=sum(
                len(d) for h in hosts for d in (*h.bound.values(), *h.jobs.values())
            ),
            pending_gpus=sum(h.pending.gpus for h in hosts),
            waiting_cells=len(self._queue),
            idle_hosts=tuple(
                sorted(h.name for h in hosts if not h.replicas and not h.bound and not h.jobs)
            ),
        )

    def device_memory(self, host: str) -> tuple[DeviceMemoryView, ...]:
        """Each GPU of ``host`` with its capacity, committed share and held memory."""
        h = self._index.hosts.get(host)
        if h is None:
            return ()
        committed: dict[int, int] = {}
        for kernel_id, devices in h.bound.items():
            share = vram_share(self._kernels[kernel_id].request)
            committed.update(dict.fromkeys(devices, share))
        return self._vram.views(host, committed)

    @property
    def parked(self) -> tuple[tuple[str, int], ...]:
        """Bound cells waiting for evictions, ``(kernel_id, term)``."""
        return self._vram.parked_cells

    @property
    def evictions(self) -> tuple[tuple[str, int, tuple[str, str]], ...]:
        """Evictions in flight: ``(host, device, (kernel_id, replica_id))``."""
        return self._vram.in_flight

    def has_kernel(self, kernel_id: str) -> bool:
        return kernel_id in self._kernels

    def subscription_ratio(self, host: str) -> float:
        """The largest of a host's per-resource ratios ``pending / spec / replicas_per_kernel``."""
        h = self._index.hosts[host]
        return self._index.ratio(h.pending, h.spec)

    # ----------------------------------------------------------------- events

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return what the gateway must do, in order."""
        match event:
            case HostAdded() | HostResourcesChanged():
                # A known name's HostAdded changes it; an unknown one's change adds it.
                self._index.update(event)
                return self._retry_waiting()
            case HostRemoved():
                return self._host_removed(event)
            case HostDrainRequested():
                host = self._index.hosts.get(event.name)
                if host is None:
                    return []
                self._index.drain(host, event.draining)
                # Undrained: its free GPUs may serve waiting cells. Drained: cells waiting on
                # it may now migrate elsewhere (``try_bind`` skips draining hosts).
                return self._retry_waiting()
            case KernelRequested():
                return self._kernel_requested(event)
            case ReplicaRequested():
                return self._replica_requested(event)
            case KernelAdopted():
                if event.kernel_id not in self._kernels:
                    try:
                        policy = policy_named(event.policy)
                    except ValueError:
                        policy = policy_named("notebookos")
                    self._kernels[event.kernel_id] = Kernel(
                        event.kernel_id,
                        event.request,
                        policy,
                        owner=event.owner,
                        pool=event.pool,
                        hosts=event.hosts,
                    )
                return []
            case ReplicaAdopted():
                return self._replica_adopted(event)
            case ReplicaReady():
                kernel = self._kernels.get(event.kernel_id)
                if kernel is None or event.replica_id not in kernel.starting:
                    return []
                kernel.starting.discard(event.replica_id)
                return self._retry_waiting()
            case MigrationRequested():
                return self._migration_requested(event)
            case ReplicaStopped():
                return self._replica_stopped(event)
            case ExecutionRequested():
                return self._execution_requested(event)
            case ExecutionFinished():
                return self._execution_finished(event)
            case ExecutionCancelled():
                return self._execution_cancelled(event)
            case KernelStopped():
                return self._kernel_stopped(event)
            case JobGpusRequested():
                return self._jobs.request(event)
            case JobGpusReleased():
                return self._retry_waiting() if self._jobs.release(event.job_id) else []
            case DeviceMemoryReported():
                kernel = self._kernels.get(event.kernel_id)
                on = kernel.replicas.get(event.replica_id) if kernel else None
                if on is not None:
                    self._vram.report(on, (event.kernel_id, event.replica_id), event.held)
                return []
            case EvictionFinished():
                return self._eviction_finished(event)
            case UserQuotaSet():
                self._quotas.set(event.user, event.gpus)
                return self._retry_waiting()
        raise TypeError(f"not a scheduler event: {event!r}")

    def _host_removed(self, event: HostRemoved) -> list[Action]:
        host = self._index.remove(event.name)
        if host is None:
            return []
        self._jobs.forget(host.jobs)
        actions: list[Action] = []
        requeued = False
        for kernel_id, replica_id in list(host.replicas):
            kernel = self._kernels[kernel_id]
            del kernel.replicas[replica_id]
            b = kernel.binding
            if b is not None and b.replica_id == replica_id:
                kernel.binding = None
                actions.append(ReleaseGpus(kernel_id, b.term, replica_id, b.host, b.device_indices))
                if self._vram.parked(kernel_id) and b.term is not None:
                    # It never reached its replica: nobody else will ask for it again.
                    self._vram.unpark(kernel_id)
                    self._queue.requeue(kernel, b.term)
                    requeued = True
        return actions + self._retry_waiting() if requeued else actions

    def _kernel_requested(self, event: KernelRequested) -> list[Action]:
        kid = event.kernel_id
        if kid in self._kernels:
            return [RejectKernel(kid, f"kernel {kid} already exists")]
        try:
            policy = policy_named(event.policy)
        except ValueError as exc:
            return [RejectKernel(kid, str(exc))]
        count = policy.replicas if event.replicas is None else event.replicas
        if count < 1:
            return [RejectKernel(kid, f"a kernel needs at least 1 replica, got {count}")]
        request, where = event.request, Confinement(event.pool, event.hosts)
        hosts, refusal = kernel_hosts(self._index, kid, request, policy, count, where)
        if not hosts:
            return refusal
        kernel = Kernel(kid, request, policy, owner=event.owner, pool=where.pool, hosts=where.hosts)
        self._kernels[kid] = kernel
        placed = tuple((self._binder.new_replica(kernel, h), h.name) for h in hosts)
        actions: list[Action] = [PlaceReplicas(kid, placed)]
        if policy.commit_at_placement and request.gpus > 0:
            replica_id, host_name = placed[0]
            actions.append(
                self._binder.bind(kernel, None, replica_id, self._index.hosts[host_name])
            )
        return actions

    def _replica_requested(self, event: ReplicaRequested) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        life_long = kernel.policy.commit_at_placement and kernel.request.gpus > 0
        host = replica_host(self._index, kernel, life_long)
        if host is None:
            reason = f"no host{kernel.confinement} has room for a replica of {kernel.kernel_id}"
            return scale_out(kernel.confinement, 1, reason)
        replica_id = self._binder.new_replica(kernel, host)
        actions: list[Action] = [PlaceReplicas(kernel.kernel_id, ((replica_id, host.name),))]
        if life_long and kernel.binding is None:
            actions.append(self._binder.bind(kernel, None, replica_id, host))
        else:
            kernel.starting.add(replica_id)
        return actions + self._retry_waiting()

    def _replica_adopted(self, event: ReplicaAdopted) -> list[Action]:
        host = self._index.hosts.get(event.host)
        if host is None:
            return []
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            try:
                policy = policy_named(event.policy)
            except ValueError:
                return []
            kernel = self._kernels[event.kernel_id] = Kernel(
                event.kernel_id, event.request, policy, pool=event.pool, hosts=event.hosts
            )
        previous = kernel.replicas.get(event.replica_id)
        if previous == event.host:
            return []
        if previous is not None:
            self._drop_replica(kernel, event.replica_id)
        self._binder.add_replica(kernel, event.replica_id, host)
        devices = event.reserved_devices
        if devices and kernel.binding is None and set(devices) <= host.free:
            self._binder.bind(kernel, None, event.replica_id, host, tuple(sorted(devices)))
        return self._retry_waiting()

    def _migration_requested(self, event: MigrationRequested) -> list[Action]:
        kid, rid = event.kernel_id, event.replica_id
        kernel = self._kernels.get(kid)
        if kernel is None:
            return [MigrationRefused(kid, rid, f"no kernel {kid}")]
        target = migration_target(self._index, kernel, rid, event.to_host)
        if isinstance(target, MigrationRefused):
            return [target]
        source = self._index.hosts[kernel.replicas[rid]]
        return [self._binder.move(kernel, rid, source, target)]

    def _replica_stopped(self, event: ReplicaStopped) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None or event.replica_id not in kernel.replicas:
            return []
        b = kernel.binding
        actions = self._drop_replica(kernel, event.replica_id)
        if (
            event.rerun
            and b is not None
            and b.replica_id == event.replica_id
            and b.term is not None
        ):
            self._queue.requeue(kernel, b.term)
        return actions + self._retry_waiting()

    def _execution_requested(self, event: ExecutionRequested) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None or event.term in kernel.waiting:
            return []
        b = kernel.binding
        if b is not None and b.term is None:
            # reservation: the cell runs with the kernel's life-long devices.
            return [BindGpus(kernel.kernel_id, event.term, b.replica_id, b.host, b.device_indices)]
        if b is not None and b.term == event.term:
            return []
        if event.gpus is not None:
            kernel.cell_gpus[event.term] = event.gpus
        gpus = kernel.request.gpus if event.gpus is None else event.gpus
        over: str | None = None  # why the owner's GPU quota holds the cell back
        if gpus == 0 and not kernel.waiting and (b is None or not b.device_indices):
            # Cells that need no GPU wait for nothing but a ready replica: nothing is
            # committed. (Behind a cell that holds GPUs they wait their turn: cells run in
            # order.)
            kernel.binding = b = None
            bound = self._binder.try_bind(kernel, event.term, event.preferred_replica, gpus)
            if bound is not None:
                return bound
        elif b is None and not kernel.waiting:
            over = self._quotas.over(kernel, gpus)
            bound = (
                None
                if over
                else self._binder.try_bind(kernel, event.term, event.preferred_replica, gpus)
            )
            if bound is not None:
                return bound
        behind = b is not None or bool(kernel.waiting)
        if behind:
            reason = "the kernel's previous cell still holds its GPUs"
        elif over is not None:
            reason = over
        elif len(kernel.starting) == len(kernel.replicas):
            reason = "the kernel has no running replica"
        else:
            reason = f"no host has {gpus} idle GPUs"
        self._queue.append(kernel, event.term, event.preferred_replica, event.gpus)
        actions: list[Action] = [WaitForGpus(kernel.kernel_id, event.term, gpus, reason, behind)]
        if over is None and b is None:
            actions += waiting_scale_out(self._index, kernel, gpus)
        return actions

    def _execution_finished(self, event: ExecutionFinished) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        kernel.cell_gpus.pop(event.term, None)
        b = kernel.binding
        if b is not None and b.term == event.term:
            actions = [self._binder.release(kernel), *self._retry_waiting()]
            if kernel.waiting and kernel.binding is None:
                # Its next cell waited only for this one; now it waits for the cluster.
                gpus = kernel.request.gpus
                actions.append(
                    WaitForGpus(
                        kernel.kernel_id, kernel.waiting[0], gpus, f"no host has {gpus} idle GPUs"
                    )
                )
            return actions
        if event.term in kernel.waiting:
            self._queue.remove(kernel, event.term)
            return [CancelWait(kernel.kernel_id, event.term)]
        return []

    def _execution_cancelled(self, event: ExecutionCancelled) -> list[Action]:
        # A bound cell keeps its GPUs until its reply (ExecutionFinished) arrives.
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        b = kernel.binding
        if b is not None and b.term == event.term and self._vram.parked(kernel.kernel_id):
            # Bound, but waiting for an eviction: it never started.
            release = self._binder.release(kernel)
            return [release, CancelWait(kernel.kernel_id, event.term), *self._retry_waiting()]
        if event.term not in kernel.waiting:
            return []
        self._queue.remove(kernel, event.term)
        kernel.cell_gpus.pop(event.term, None)
        return [CancelWait(kernel.kernel_id, event.term)]

    def _kernel_stopped(self, event: KernelStopped) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        actions: list[Action] = []
        for term in list(kernel.waiting):
            self._queue.remove(kernel, term)
            actions.append(CancelWait(kernel.kernel_id, term))
        for replica_id in list(kernel.replicas):
            actions += self._drop_replica(kernel, replica_id, requeue=False)
        del self._kernels[event.kernel_id]
        return actions + self._retry_waiting()

    def _eviction_finished(self, event: EvictionFinished) -> list[Action]:
        actions: list[Action] = []
        for kernel_id, outcome in self._vram.finished(event):
            kernel = self._kernels[kernel_id]
            b = kernel.binding
            assert b is not None and b.term is not None
            if isinstance(outcome, list):
                actions += outcome
            elif isinstance(outcome, str):
                actions.append(RefuseCell(kernel_id, b.term, outcome))
                actions += self._execution_finished(ExecutionFinished(kernel_id, b.term))
            else:
                actions.append(
                    BindGpus(kernel_id, b.term, b.replica_id, b.host, b.device_indices, outcome)
                )
        return actions

    def _drop_replica(self, kernel: Kernel, replica_id: str, requeue: bool = True) -> list[Action]:
        """Release the replica's binding (a parked cell goes back to the queue's head unless
        ``requeue`` is False) and remove its claim."""
        actions: list[Action] = []
        b = kernel.binding
        if b is not None and b.replica_id == replica_id:
            parked = self._vram.parked(kernel.kernel_id)
            actions.append(self._binder.release(kernel))
            if parked and requeue and b.term is not None:
                self._queue.requeue(kernel, b.term)  # it never reached the replica
        host = self._index.hosts[kernel.replicas[replica_id]]
        self._binder.remove_claim(kernel, replica_id, host)
        return actions

    def _retry_waiting(self) -> list[Action]:
        """Serve the waiting queue (see :meth:`WaitingQueue.serve`)."""
        return self._queue.serve(self._kernels, self._index, self._binder, self._quotas.over)
