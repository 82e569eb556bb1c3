"""The scheduler: resource accounting, placement, binding and migration decisions.

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

Batch jobs: the job manager picks a worker and free devices from the host views, then asks
with ``JobGpusRequested``; the devices are committed to the job (and count as a pending claim
on its host) until ``JobGpusReleased``, so a GPU is never given to a job and a cell at once.

GPU memory (issue 12): ``_vram.VramLedger`` keeps each device's capacity, what replicas keep
there between cells (``DeviceMemoryReported``) and the evictions in flight; a bound cell whose
devices hold another replica's memory is *parked* (``Evict`` out, ``EvictionFinished`` in)
before its ``BindGpus`` is returned (see that module for the rules).

Why one module of over 500 lines: claims, bindings, the waiting queue and the placement
indexes change together under one invariant (``test_scheduler``'s state machine checks it
after every event); split, each part would depend on the others' private state.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ._actions import (
    Action,
    BindGpus,
    BindJobGpus,
    CancelWait,
    JobGpusRefused,
    Migrate,
    MigrationRefused,
    PlaceReplicas,
    RefuseCell,
    RejectKernel,
    ReleaseGpus,
    ScaleOut,
    WaitForGpus,
)
from ._confinement import ANYWHERE, Confinement
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
from ._policies import Policy, policy_named
from ._resources import Resources
from ._views import Binding, ClusterSummary, DeviceMemoryView, HostView, KernelView
from ._vram import GIB, VramLedger, device_capacities, vram_share

__all__ = ["Scheduler", "SchedulerConfig"]

_FIELD_WORDS = {
    "gpus": "GPUs",
    "millicpus": "millicpus",
    "memory_mb": "MB of memory",
    "vram_gb": "GB of VRAM",
}


def numbered_replica_id(kernel_id: str, number: int) -> str:
    """Deterministic replica ids (``<kernel>-r<n>``) for tests and the simulator."""
    return f"{kernel_id}-r{number}"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    #: A host refuses a placement that would push any resource's
    #: ``pending / spec / replicas_per_kernel`` past this.
    max_subscription_ratio: float = 7.0
    #: The denominator of the subscription ratio (NotebookOS: the cluster's replica count).
    replicas_per_kernel: int = 3
    #: Names a kernel's ``number``-th replica; the gateway passes one that is unique across
    #: restarts of the kernel and of itself.
    new_replica_id: Callable[[str, int], str] = numbered_replica_id

    def __post_init__(self) -> None:
        if self.max_subscription_ratio <= 0 or self.replicas_per_kernel < 1:
            raise ValueError("max_subscription_ratio must be > 0 and replicas_per_kernel ≥ 1")


@dataclass(slots=True)
class _Host:
    name: str
    spec: Resources
    devices: tuple[int, ...]
    free: set[int]
    pending: Resources = field(default_factory=Resources)
    replicas: dict[tuple[str, str], None] = field(default_factory=dict)
    bound: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Devices committed to batch jobs, by job id.
    jobs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    draining: bool = False
    #: An operator drained it (``HostDrainRequested``); ``draining`` also covers shrinking.
    drain_requested: bool = False
    version: int = 0
    #: Its host pool (``HostAdded.pool``); None: in no pool.
    pool: str | None = None
    #: The ``_by_free`` bucket this host sits in (None: not indexed).
    free_bucket: int | None = None

    def load_key(self) -> tuple[float, int, str]:
        claims = len(self.replicas) + len(self.jobs)
        return (self.pending.gpus / max(self.spec.gpus, 1), claims, self.name)


@dataclass(slots=True)
class _Kernel:
    kernel_id: str
    request: Resources
    policy: Policy
    replicas: dict[str, str] = field(default_factory=dict)  # replica id -> host
    binding: Binding | None = None
    waiting: list[int] = field(default_factory=list)
    #: Replicas placed as replacements that have not caught up yet: they cannot execute.
    starting: set[str] = field(default_factory=set)
    next_replica: int = 0
    #: term -> the GPUs that cell asked for itself (``%%cpu``: 0), until it ends
    cell_gpus: dict[int, int] = field(default_factory=dict)
    #: The user it belongs to (``UserQuotaSet``).
    owner: str = ""
    #: The host pool its replicas must run in (None: any host).
    pool: str | None = None
    #: The only hosts its replicas may run on (None: any; ``KernelRequested.hosts``).
    hosts: frozenset[str] | None = None

    @property
    def confinement(self) -> Confinement:
        return Confinement(self.pool, self.hosts)

    def new_replica_id(self, name: Callable[[str, int], str]) -> str:
        while True:
            self.next_replica += 1
            replica_id = name(self.kernel_id, self.next_replica)
            if replica_id not in self.replicas:
                return replica_id


@dataclass(frozen=True, slots=True)
class _Wait:
    kernel_id: str
    term: int
    preferred: str | None
    #: the cell's own GPU count (``%%cpu``: 0), None: the kernel's request
    gpus: int | None = None
    #: Its place in the queue: waits are served in ascending ``seq`` (appended cells count
    #: up from 1, cells put back at the head count down from 0).
    seq: int = 0


class Scheduler:
    """Events in (:meth:`handle`), actions out; attributes are read-only to callers."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self._config = config or SchedulerConfig()
        self._hosts: dict[str, _Host] = {}
        self._kernels: dict[str, _Kernel] = {}
        # The waiting queue (FIFO by ``_Wait.seq``), keyed by (kernel id, term) so that a
        # wait leaves it in O(1); and the kernels with a waiting cell, so that a retry looks
        # only at each kernel's oldest cell (the only one that may start: cells run in order).
        self._queue: dict[tuple[str, int], _Wait] = {}
        self._waiting_kernels: dict[str, None] = {}
        self._tail_seq = 0
        self._head_seq = 1
        #: The host of every job holding GPUs.
        self._jobs: dict[str, str] = {}
        # Least-loaded placement: per spec GPU count, a heap of (load key, version) with
        # lazy deletion; every placeable host has exactly one live entry.
        self._heaps: dict[int, list[tuple[tuple[float, int, str], int]]] = {}
        # Binding and migration: non-draining hosts by number of free GPU devices.
        self._by_free: dict[int, dict[str, None]] = {}
        #: The largest spec of each resource, per pool (key None: every host).
        self._max_spec: dict[str | None, Resources] = {}
        # Heap entry versions come from one counter, so that a host removed and added again
        # never matches an entry left from its earlier life.
        self._versions = 0
        self._vram = VramLedger()
        #: Users' GPU quotas (``UserQuotaSet``) and the owners of jobs holding GPUs.
        self._quotas: dict[str, int] = {}
        self._job_owners: dict[str, str] = {}

    # ----------------------------------------------------------------- views

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def hosts(self) -> Mapping[str, HostView]:
        return {name: self._host_view(h) for name, h in self._hosts.items()}

    @property
    def kernels(self) -> Mapping[str, KernelView]:
        return {k.kernel_id: self._kernel_view(k) for k in self._kernels.values()}

    def kernel(self, kernel_id: str) -> KernelView | None:
        """One kernel's view (``kernels`` builds every one)."""
        k = self._kernels.get(kernel_id)
        return None if k is None else self._kernel_view(k)

    def host(self, name: str) -> HostView | None:
        """One host's view (``hosts`` builds every one)."""
        h = self._hosts.get(name)
        return None if h is None else self._host_view(h)

    @staticmethod
    def _kernel_view(k: _Kernel) -> KernelView:
        return KernelView(
            k.kernel_id,
            k.request,
            k.policy.name,
            tuple(k.replicas.items()),
            k.binding,
            tuple(k.waiting),
            k.pool,
            k.hosts,
        )

    @property
    def waiting(self) -> tuple[tuple[str, int], ...]:
        """Cells waiting for GPUs, ``(kernel_id, term)``, in queue order."""
        ordered = sorted(self._queue.values(), key=lambda w: w.seq)
        return tuple((w.kernel_id, w.term) for w in ordered)

    def summary(self) -> ClusterSummary:
        hosts = self._hosts.values()
        return ClusterSummary(
            hosts=len(self._hosts),
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
        h = self._hosts.get(host)
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
        h = self._hosts[host]
        return self._ratio(h.pending, h.spec)

    # ----------------------------------------------------------------- events

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return what the gateway must do, in order."""
        match event:
            case HostAdded():
                return self._host_added(event)
            case HostRemoved():
                return self._host_removed(event)
            case HostDrainRequested():
                return self._host_drain_requested(event)
            case HostResourcesChanged():
                return self._host_changed(event)
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
                    self._kernels[event.kernel_id] = _Kernel(
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
                return self._job_gpus_requested(event)
            case JobGpusReleased():
                return self._job_gpus_released(event)
            case DeviceMemoryReported():
                kernel = self._kernels.get(event.kernel_id)
                host = kernel.replicas.get(event.replica_id) if kernel else None
                if host is not None:
                    self._vram.report(host, (event.kernel_id, event.replica_id), event.held)
                return []
            case EvictionFinished():
                return self._eviction_finished(event)
            case UserQuotaSet():
                if event.gpus is None:
                    self._quotas.pop(event.user, None)
                else:
                    self._quotas[event.user] = event.gpus
                return self._retry_waiting()
        raise TypeError(f"not a scheduler event: {event!r}")

    def _host_added(self, event: HostAdded) -> list[Action]:
        if event.name in self._hosts:
            return self._host_changed(
                HostResourcesChanged(
                    event.name, event.spec, event.gpu_devices, event.device_vram, event.pool
                )
            )
        devices = _devices(event.spec, event.gpu_devices)
        vram = device_capacities(event.spec, event.gpu_devices, event.device_vram)
        host = _Host(event.name, event.spec, devices, set(devices), pool=event.pool)
        self._hosts[event.name] = host
        self._vram.set_host(event.name, vram)
        self._max_spec.clear()
        self._reindex(host)
        return self._retry_waiting()

    def _host_removed(self, event: HostRemoved) -> list[Action]:
        host = self._hosts.pop(event.name, None)
        if host is None:
            return []
        self._unindex_free(host)
        host.version = -1  # kills its heap entry
        self._max_spec.clear()
        for job_id in host.jobs:
            del self._jobs[job_id]
            self._job_owners.pop(job_id, None)
        self._vram.remove_host(event.name)
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
                    self._requeue(kernel, b.term)
                    requeued = True
        return actions + self._retry_waiting() if requeued else actions

    def _host_changed(self, event: HostResourcesChanged) -> list[Action]:
        host = self._hosts.get(event.name)
        if host is None:
            return self._host_added(
                HostAdded(event.name, event.spec, event.gpu_devices, event.device_vram, event.pool)
            )
        devices = _devices(event.spec, event.gpu_devices)
        self._vram.set_host(
            event.name, device_capacities(event.spec, event.gpu_devices, event.device_vram)
        )
        self._unindex_free(host)
        host.spec = event.spec
        host.devices = devices
        host.pool = event.pool
        self._max_spec.clear()
        self._refresh_free(host)
        self._reindex(host)
        return self._retry_waiting()

    def _host_drain_requested(self, event: HostDrainRequested) -> list[Action]:
        host = self._hosts.get(event.name)
        if host is None:
            return []
        self._unindex_free(host)
        host.drain_requested = event.draining
        self._refresh_free(host)
        self._reindex(host)
        # Undrained: its free GPUs may serve waiting cells. Drained: cells waiting on it
        # may now migrate elsewhere (``_try_bind`` skips draining hosts).
        return self._retry_waiting()

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
        if not self._hosts and where.scalable:
            reason = "the cluster has no hosts"
            return [RejectKernel(kid, reason), ScaleOut(count, reason, event.hosts)]
        too_big = self._too_big(request, where)
        if too_big is not None:
            return [RejectKernel(kid, too_big)]
        kernel = _Kernel(
            kid, request, policy, owner=event.owner, pool=where.pool, hosts=where.hosts
        )
        if policy.commit_at_placement and request.gpus > 0:
            if count != 1:
                return [RejectKernel(kid, f"policy {policy.name} runs 1 replica, got {count}")]
            target = self._free_host(request, exclude=(), where=where)
            if target is None:
                reason = (
                    f"requests {request.gpus} GPUs; no host{where} has {request.gpus} free GPUs"
                )
                return [RejectKernel(kid, reason, full=True), *_scale_out(where, 1, reason)]
            hosts = [target]
        else:
            hosts = self._least_loaded(request, count, exclude=(), where=where)
            if len(hosts) < count:
                reason = (
                    f"{count} replicas need {count} hosts{where} with room for "
                    f"{_describe(request)}; {len(hosts)} have room"
                )
                return [
                    RejectKernel(kid, reason, full=True),
                    *_scale_out(where, count - len(hosts), reason),
                ]
        self._kernels[kid] = kernel
        placed = tuple(
            (
                self._add_replica(kernel, kernel.new_replica_id(self._config.new_replica_id), h),
                h.name,
            )
            for h in hosts
        )
        actions: list[Action] = [PlaceReplicas(kid, placed)]
        if policy.commit_at_placement and request.gpus > 0:
            replica_id, host_name = placed[0]
            actions.append(self._bind(kernel, None, replica_id, self._hosts[host_name]))
        return actions

    def _replica_requested(self, event: ReplicaRequested) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        exclude = set(kernel.replicas.values())
        life_long = kernel.policy.commit_at_placement and kernel.request.gpus > 0
        if life_long:
            target = self._free_host(kernel.request, exclude, kernel.confinement)
            hosts = [] if target is None else [target]
        else:
            hosts = self._least_loaded(kernel.request, 1, exclude, kernel.confinement)
        if not hosts:
            reason = f"no host{kernel.confinement} has room for a replica of {kernel.kernel_id}"
            return _scale_out(kernel.confinement, 1, reason)
        replica_id = self._add_replica(
            kernel, kernel.new_replica_id(self._config.new_replica_id), hosts[0]
        )
        actions: list[Action] = [PlaceReplicas(kernel.kernel_id, ((replica_id, hosts[0].name),))]
        if life_long and kernel.binding is None:
            actions.append(self._bind(kernel, None, replica_id, hosts[0]))
        else:
            kernel.starting.add(replica_id)
        return actions + self._retry_waiting()

    def _replica_adopted(self, event: ReplicaAdopted) -> list[Action]:
        host = self._hosts.get(event.host)
        if host is None:
            return []
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            try:
                policy = policy_named(event.policy)
            except ValueError:
                return []
            kernel = self._kernels[event.kernel_id] = _Kernel(
                event.kernel_id, event.request, policy, pool=event.pool, hosts=event.hosts
            )
        previous = kernel.replicas.get(event.replica_id)
        if previous == event.host:
            return []
        if previous is not None:
            self._drop_replica(kernel, event.replica_id)
        self._add_replica(kernel, event.replica_id, host)
        devices = event.reserved_devices
        if devices and kernel.binding is None and set(devices) <= host.free:
            self._bind(kernel, None, event.replica_id, host, tuple(sorted(devices)))
        return self._retry_waiting()

    def _migration_requested(self, event: MigrationRequested) -> list[Action]:
        kid, rid = event.kernel_id, event.replica_id
        kernel = self._kernels.get(kid)
        if kernel is None:
            return [MigrationRefused(kid, rid, f"no kernel {kid}")]
        if rid not in kernel.replicas:
            return [MigrationRefused(kid, rid, f"kernel {kid} has no replica {rid}")]
        b = kernel.binding
        if b is not None and b.replica_id == rid:
            why = "holds GPUs for its whole life" if b.term is None else "is executing a cell"
            return [MigrationRefused(kid, rid, f"replica {rid} {why}; it cannot move now")]
        if len(kernel.replicas) < 2:
            return [
                MigrationRefused(kid, rid, "a kernel with one replica has no peer to catch up from")
            ]
        others = {h for r, h in kernel.replicas.items() if r != rid}
        source = self._hosts[kernel.replicas[rid]]
        if event.to_host is not None:
            target = self._hosts.get(event.to_host)
            if target is None:
                return [MigrationRefused(kid, rid, f"no host named {event.to_host}")]
            if target.name == source.name or target.name in others:
                return [
                    MigrationRefused(
                        kid, rid, f"host {target.name} already runs a replica of kernel {kid}"
                    )
                ]
            if kernel.pool is not None and target.pool != kernel.pool:
                where = "no pool" if target.pool is None else f"pool {target.pool!r}"
                return [
                    MigrationRefused(
                        kid,
                        rid,
                        f"host {target.name} is in {where}; kernel {kid} runs only in pool "
                        f"{kernel.pool!r}",
                    )
                ]
            if kernel.hosts is not None and target.name not in kernel.hosts:
                only = str(Confinement(hosts=kernel.hosts)).removeprefix(" among hosts ")
                return [
                    MigrationRefused(
                        kid, rid, f"kernel {kid} runs only on hosts {only}, not on {target.name}"
                    )
                ]
            if not self._can_place(target, kernel.request):
                return [
                    MigrationRefused(
                        kid,
                        rid,
                        f"host {target.name} has no room for {_describe(kernel.request)} "
                        f"(draining, too small, or over the subscription cap)",
                    )
                ]
        else:
            found = self._least_loaded(
                kernel.request, 1, others | {source.name}, kernel.confinement
            )
            if not found:
                return [
                    MigrationRefused(
                        kid,
                        rid,
                        f"no other host{kernel.confinement} has room for "
                        f"{_describe(kernel.request)}",
                    )
                ]
            target = found[0]
        return [self._move(kernel, rid, source, target)]

    def _move(self, kernel: _Kernel, replica_id: str, source: _Host, target: _Host) -> Migrate:
        self._remove_claim(kernel, replica_id, source)
        new_id = kernel.new_replica_id(self._config.new_replica_id)
        self._add_replica(kernel, new_id, target)
        return Migrate(kernel.kernel_id, replica_id, source.name, target.name, new_id)

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
            self._requeue(kernel, b.term)
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
            bound = self._try_bind(kernel, event.term, event.preferred_replica, gpus)
            if bound is not None:
                return bound
        elif b is None and not kernel.waiting:
            over = self._over_quota(kernel, gpus)
            bound = (
                None if over else self._try_bind(kernel, event.term, event.preferred_replica, gpus)
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
        kernel.waiting.append(event.term)
        self._tail_seq += 1
        self._enqueue(
            _Wait(kernel.kernel_id, event.term, event.preferred_replica, event.gpus, self._tail_seq)
        )
        actions: list[Action] = [WaitForGpus(kernel.kernel_id, event.term, gpus, reason, behind)]
        if (
            over is None
            and b is None
            and self._can_use_new_host(kernel)
            and kernel.confinement.scalable
            and max(self._by_free, default=0) < gpus
        ):
            reason = f"a cell of {kernel.kernel_id} waits for {gpus} GPUs"
            actions.append(ScaleOut(1, reason, kernel.hosts))
        return actions

    @staticmethod
    def _can_use_new_host(kernel: _Kernel) -> bool:
        """Whether a host started now could run a waiting cell of ``kernel``: only by a
        migration there, so only under a policy that migrates and with a peer replica to catch
        up from (``_try_bind``). A ``batch`` or lone-replica cell waits for its own host: a
        ``ScaleOut`` for it would start a host it never uses (issue 18: 6,577 hosts started and
        stopped in one replay of the Sensei trace)."""
        return kernel.policy.migrates and len(kernel.replicas) >= 2

    def _over_quota(self, kernel: _Kernel, gpus: int) -> str | None:
        """Why a cell of ``kernel`` needing ``gpus`` GPUs would pass its owner's quota now
        (None: it would not). Counted when asked: only users with a quota pay for it."""
        limit = self._quotas.get(kernel.owner) if gpus > 0 else None
        if limit is None:
            return None
        held = sum(
            len(k.binding.device_indices)
            for k in self._kernels.values()
            if k.owner == kernel.owner and k.binding is not None
        )
        held += sum(
            len(self._hosts[host].jobs.get(job_id, ()))
            for job_id, host in self._jobs.items()
            if self._job_owners.get(job_id) == kernel.owner and host in self._hosts
        )
        if held + gpus <= limit:
            return None
        return (
            f"user {kernel.owner!r} holds {held} of their {limit} GPU(s) (quota) in other "
            "cells and jobs"
        )

    def _execution_finished(self, event: ExecutionFinished) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        kernel.cell_gpus.pop(event.term, None)
        b = kernel.binding
        if b is not None and b.term == event.term:
            actions = [self._release(kernel), *self._retry_waiting()]
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
            self._unqueue(kernel, event.term)
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
            release = self._release(kernel)
            return [release, CancelWait(kernel.kernel_id, event.term), *self._retry_waiting()]
        if event.term not in kernel.waiting:
            return []
        self._unqueue(kernel, event.term)
        kernel.cell_gpus.pop(event.term, None)
        return [CancelWait(kernel.kernel_id, event.term)]

    def _kernel_stopped(self, event: KernelStopped) -> list[Action]:
        kernel = self._kernels.get(event.kernel_id)
        if kernel is None:
            return []
        actions: list[Action] = []
        for term in list(kernel.waiting):
            self._unqueue(kernel, term)
            actions.append(CancelWait(kernel.kernel_id, term))
        for replica_id in list(kernel.replicas):
            actions += self._drop_replica(kernel, replica_id, requeue=False)
        del self._kernels[event.kernel_id]
        return actions + self._retry_waiting()

    # ----------------------------------------------------------------- jobs

    def _job_gpus_requested(self, event: JobGpusRequested) -> list[Action]:
        job_id = event.job_id
        held = self._jobs.get(job_id)
        if held is not None:
            return [JobGpusRefused(job_id, f"job {job_id} already holds GPUs on {held}")]
        host = self._hosts.get(event.host)
        if host is None:
            return [JobGpusRefused(job_id, f"no host named {event.host}")]
        if host.drain_requested:
            return [JobGpusRefused(job_id, f"host {host.name} is draining")]
        devices = tuple(sorted(event.device_indices))
        if not devices or len(set(devices)) != len(devices) or not set(devices) <= host.free:
            return [
                JobGpusRefused(job_id, f"GPUs {list(devices)} of host {host.name} are not all free")
            ]
        host.free.difference_update(devices)
        host.jobs[job_id] = devices
        if event.owner:
            self._job_owners[job_id] = event.owner
        host.pending = host.pending + Resources(gpus=len(devices))
        self._jobs[job_id] = host.name
        self._reindex(host)
        evict = self._vram.evict_for(host.name, devices, f"job {job_id}")
        return [BindJobGpus(job_id, host.name, devices), *evict]

    def _job_gpus_released(self, event: JobGpusReleased) -> list[Action]:
        name = self._jobs.pop(event.job_id, None)
        self._job_owners.pop(event.job_id, None)
        if name is None:
            return []
        host = self._hosts[name]
        devices = host.jobs.pop(event.job_id)
        host.pending = host.pending - Resources(gpus=len(devices))
        self._refresh_free(host)
        self._reindex(host)
        return self._retry_waiting()

    # ----------------------------------------------------------------- binding

    def _try_bind(
        self, kernel: _Kernel, term: int, preferred: str | None, gpus: int | None = None
    ) -> list[Action] | None:
        """Bind the cell's GPUs (``gpus``, default the kernel's request) on a replica's host,
        else migrate, else None (wait).

        NotebookOS ``FindReadyReplica``: the previous executor if its host can commit now,
        else the replica whose host has the most idle GPUs."""
        gpus = kernel.request.gpus if gpus is None else gpus
        usable = [
            (rid, self._hosts[h])
            for rid, h in kernel.replicas.items()
            if rid not in kernel.starting
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
            return self._gate(self._bind(kernel, term, chosen[0], chosen[1], devices))
        # A lone replica has no peer to catch up from: it waits for its own host.
        if not kernel.policy.migrates or len(usable) < 2:
            return None
        target = self._free_host(
            kernel.request, exclude=set(kernel.replicas.values()), where=kernel.confinement
        )
        if target is None:
            return None
        ids = [rid for rid, _ in usable]
        replica_id = preferred if preferred in ids else ids[0]
        source = self._hosts[kernel.replicas[replica_id]]
        migrate = self._move(kernel, replica_id, source, target)
        return [migrate, *self._gate(self._bind(kernel, term, migrate.new_replica_id, target))]

    def _gate(self, bind: BindGpus) -> list[Action]:
        """The binding, or the evictions its cell waits for (parked, see ``_vram``)."""
        evictions = self._vram.gate(bind)
        return [bind] if evictions is None else list(evictions)

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

    def _bind(
        self,
        kernel: _Kernel,
        term: int | None,
        replica_id: str,
        host: _Host,
        devices: tuple[int, ...] | None = None,
    ) -> BindGpus:
        """Commit ``devices`` (default: the lowest free ones the request needs) on ``host``."""
        if devices is None:
            holder = (kernel.kernel_id, replica_id)
            share = vram_share(kernel.request)
            devices = self._vram.choose(host.name, host.free, kernel.request.gpus, holder, share)
        if devices:
            self._unindex_free(host)
            host.free.difference_update(devices)
            host.bound[kernel.kernel_id] = devices
            self._index_free(host)
        kernel.binding = Binding(term, replica_id, host.name, devices)
        return BindGpus(kernel.kernel_id, term, replica_id, host.name, devices)

    def _release(self, kernel: _Kernel) -> ReleaseGpus:
        b = kernel.binding
        assert b is not None
        kernel.binding = None
        self._vram.unpark(kernel.kernel_id)
        host = self._hosts.get(b.host)
        if host is not None and kernel.kernel_id in host.bound:
            del host.bound[kernel.kernel_id]
            self._unindex_free(host)
            self._refresh_free(host)
            self._reindex(host)
        return ReleaseGpus(kernel.kernel_id, b.term, b.replica_id, b.host, b.device_indices)

    def _retry_waiting(self) -> list[Action]:
        """Give waiting cells, oldest first, whatever GPUs are free now.

        Decides exactly as trying every queued cell in queue order would, but looks only at
        each waiting kernel's oldest cell (a later one never starts before it) and tries only
        those that :meth:`_may_bind` admits: during a retry free devices only shrink, so a
        cell that cannot bind at its start cannot bind later in it. Cost: O(waiting kernels)
        per event, not O(waiting cells) (issue 18: ``batch`` queues thousands of cells)."""
        actions: list[Action] = []
        if not self._waiting_kernels:
            return actions
        most_free = max(self._by_free, default=0)
        candidates: list[tuple[_Wait, _Kernel, int]] = []
        for kernel_id in self._waiting_kernels:
            kernel = self._kernels[kernel_id]
            if kernel.binding is not None:
                continue
            wait = self._queue[(kernel_id, kernel.waiting[0])]
            gpus = kernel.request.gpus if wait.gpus is None else wait.gpus
            if gpus <= most_free and self._may_bind(kernel, gpus):
                candidates.append((wait, kernel, gpus))
        candidates.sort(key=lambda c: c[0].seq)
        for wait, kernel, gpus in candidates:
            if gpus > most_free:
                continue  # cheap skip: no host has that many idle GPUs
            if self._over_quota(kernel, gpus) is not None:
                continue
            bound = self._try_bind(kernel, wait.term, wait.preferred, gpus)
            if bound is not None:
                self._unqueue(kernel, wait.term)
                actions += bound
                most_free = max(self._by_free, default=0)
        return actions

    def _may_bind(self, kernel: _Kernel, gpus: int) -> bool:
        """False only when :meth:`_try_bind` would surely return None now: no usable replica's
        host has ``gpus`` idle devices and the kernel cannot migrate (its policy does not, or
        it has fewer than two usable replicas)."""
        if gpus == 0:
            return True
        usable = 0
        for replica_id, name in kernel.replicas.items():
            if replica_id in kernel.starting:
                continue
            usable += 1
            host = self._hosts[name]
            if not host.draining and len(host.free) >= gpus:
                return True
        return kernel.policy.migrates and usable >= 2

    def _enqueue(self, wait: _Wait) -> None:
        self._queue[(wait.kernel_id, wait.term)] = wait
        self._waiting_kernels[wait.kernel_id] = None

    def _requeue(self, kernel: _Kernel, term: int) -> None:
        """Put a cell that was bound but never started back at the head of the queue."""
        if term not in kernel.waiting:
            kernel.waiting.insert(0, term)
            self._head_seq -= 1
            gpus = kernel.cell_gpus.get(term)
            self._enqueue(_Wait(kernel.kernel_id, term, None, gpus, self._head_seq))

    def _unqueue(self, kernel: _Kernel, term: int) -> None:
        kernel.waiting.remove(term)
        del self._queue[(kernel.kernel_id, term)]
        if not kernel.waiting:
            del self._waiting_kernels[kernel.kernel_id]

    # ----------------------------------------------------------------- placement

    def _can_place(self, host: _Host, request: Resources, where: Confinement = ANYWHERE) -> bool:
        """Whether ``host`` takes one more claim of ``request`` (only where ``where`` admits)."""
        if not where.admits(host.name, host.pool):
            return False
        if host.draining or not request.fits(host.spec):
            return False
        return self._ratio(host.pending + request, host.spec) <= self._config.max_subscription_ratio

    def _ratio(self, pending: Resources, spec: Resources) -> float:
        worst = 0.0
        capacity = spec.fields()
        for name, value in pending.fields().items():
            if value <= 0:
                continue
            if capacity[name] <= 0:
                return float("inf")
            worst = max(worst, value / capacity[name] / self._config.replicas_per_kernel)
        return worst

    def _least_loaded(
        self,
        request: Resources,
        count: int,
        exclude: Iterable[str],
        where: Confinement = ANYWHERE,
    ) -> list[_Host]:
        """Up to ``count`` distinct placeable hosts (that ``where`` admits), least
        GPU-subscribed first."""
        excluded = set(exclude)
        found: list[tuple[tuple[float, int, str], _Host]] = []
        for gpus, heap in self._heaps.items():
            if gpus < request.gpus:
                continue
            popped: list[tuple[tuple[float, int, str], int]] = []
            eligible = 0
            while heap and eligible < count:
                entry = heapq.heappop(heap)
                host = self._hosts.get(entry[0][2])
                if host is None or host.version != entry[1]:
                    continue  # stale
                popped.append(entry)
                if host.name not in excluded and self._can_place(host, request, where):
                    found.append((entry[0], host))
                    eligible += 1
            for entry in popped:
                heapq.heappush(heap, entry)
            if len(heap) > 64 + 4 * len(self._hosts):
                self._compact(gpus)
        found.sort(key=lambda f: f[0])
        return [host for _, host in found[:count]]

    def _free_host(
        self, request: Resources, exclude: Iterable[str], where: Confinement = ANYWHERE
    ) -> _Host | None:
        """A placeable host (that ``where`` admits) with at least ``request.gpus`` free devices,
        most free first."""
        excluded = set(exclude)
        for free in sorted(self._by_free, reverse=True):
            if free < request.gpus:
                break
            for name in self._by_free[free]:
                host = self._hosts[name]
                if (
                    name not in excluded
                    and self._can_place(host, request, where)
                    and self._vram.fits(name, host.free, vram_share(request), request.gpus)
                ):
                    return host
        return None

    def _too_big(self, request: Resources, where: Confinement = ANYWHERE) -> str | None:
        """Why no host (that ``where`` admits) could ever hold ``request``; None: one could,
        or, confined to named hosts, none of them has registered yet (hosts still to come
        are not judged)."""
        names = [h.name for h in self._hosts.values() if where.admits(h.name, h.pool)]
        if not names:
            return None if where.hosts is not None else f"no host is{where}"
        # Only a pool's largest spec is kept: named hosts are few and rarely asked for.
        biggest = self._max_spec.get(where.pool) if where.hosts is None else None
        if biggest is None:
            specs = [self._hosts[name].spec for name in names]
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

    # ----------------------------------------------------------------- accounting

    def _add_replica(self, kernel: _Kernel, replica_id: str, host: _Host) -> str:
        kernel.replicas[replica_id] = host.name
        host.replicas[(kernel.kernel_id, replica_id)] = None
        host.pending = host.pending + kernel.request
        self._reindex(host)
        return replica_id

    def _remove_claim(self, kernel: _Kernel, replica_id: str, host: _Host) -> None:
        del kernel.replicas[replica_id]
        kernel.starting.discard(replica_id)
        del host.replicas[(kernel.kernel_id, replica_id)]
        host.pending = host.pending - kernel.request
        self._vram.forget(host.name, (kernel.kernel_id, replica_id))
        self._reindex(host)

    def _drop_replica(self, kernel: _Kernel, replica_id: str, requeue: bool = True) -> list[Action]:
        actions: list[Action] = []
        b = kernel.binding
        if b is not None and b.replica_id == replica_id:
            parked = self._vram.parked(kernel.kernel_id)
            actions.append(self._release(kernel))
            if parked and requeue and b.term is not None:
                self._requeue(kernel, b.term)  # it never reached the replica
        self._remove_claim(kernel, replica_id, self._hosts[kernel.replicas[replica_id]])
        return actions

    def _refresh_free(self, host: _Host) -> None:
        """Recompute free devices and draining after the spec or the bindings changed."""
        used = {d for devices in (*host.bound.values(), *host.jobs.values()) for d in devices}
        host.free = set(host.devices) - used
        host.draining = host.drain_requested or not used <= set(host.devices)

    # ----------------------------------------------------------------- indexes

    def _reindex(self, host: _Host) -> None:
        self._versions += 1
        host.version = self._versions
        if not host.draining:
            heap = self._heaps.setdefault(host.spec.gpus, [])
            heapq.heappush(heap, (host.load_key(), host.version))
        self._unindex_free(host)
        self._index_free(host)

    def _compact(self, gpus: int) -> None:
        heap = [
            (h.load_key(), h.version)
            for h in self._hosts.values()
            if h.spec.gpus == gpus and not h.draining
        ]
        heapq.heapify(heap)
        self._heaps[gpus] = heap

    def _index_free(self, host: _Host) -> None:
        if not host.draining:
            host.free_bucket = len(host.free)
            self._by_free.setdefault(host.free_bucket, {})[host.name] = None

    def _unindex_free(self, host: _Host) -> None:
        if host.free_bucket is None:
            return
        names = self._by_free[host.free_bucket]
        del names[host.name]
        if not names:
            del self._by_free[host.free_bucket]
        host.free_bucket = None

    def _host_view(self, h: _Host) -> HostView:
        return HostView(
            name=h.name,
            spec=h.spec,
            gpu_devices=h.devices,
            pending=h.pending,
            bound=tuple(h.bound.items()),
            replicas=tuple(h.replicas),
            draining=h.draining,
            subscription_ratio=self._ratio(h.pending, h.spec),
            jobs=tuple(h.jobs.items()),
            pool=h.pool,
        )


def _devices(spec: Resources, devices: tuple[int, ...]) -> tuple[int, ...]:
    chosen = devices or tuple(range(spec.gpus))
    if len(chosen) != spec.gpus or len(set(chosen)) != len(chosen):
        raise ValueError(f"a host with {spec.gpus} GPUs needs {spec.gpus} distinct device indices")
    return tuple(sorted(chosen))


def _describe(request: Resources) -> str:
    return (
        f"{request.gpus} GPUs, {request.millicpus} millicpus, {request.memory_mb} MB, "
        f"{request.vram_gb:g} GB VRAM"
    )


def _scale_out(where: Confinement, count: int, reason: str) -> list[Action]:
    """A ``ScaleOut`` for a kernel without a pool (the auto-scaler's hosts join none), among
    its named hosts if it has them."""
    return [ScaleOut(count, reason, where.hosts)] if where.scalable else []
