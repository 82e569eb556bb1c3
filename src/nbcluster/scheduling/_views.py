"""Read-only snapshots of the scheduler's state, for callers, metrics and tests.

:class:`Scheduler` builds these on request (``hosts``, ``kernels``, ``summary()``); they are
frozen copies, so holding one never lets a caller change the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._resources import Resources

__all__ = [
    "Binding",
    "ClusterSummary",
    "DeviceMemoryView",
    "EvictionWait",
    "HostView",
    "KernelView",
]


@dataclass(frozen=True, slots=True)
class Binding:
    """GPUs committed to one replica: for one cell (``term``) or for life (``term`` None)."""

    term: int | None
    replica_id: str
    host: str
    device_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    spec: Resources
    gpu_devices: tuple[int, ...]
    #: Sum of the requests of every replica placed here.
    pending: Resources
    #: GPU devices bound to a replica, by kernel id.
    bound: tuple[tuple[str, tuple[int, ...]], ...]
    replicas: tuple[tuple[str, str], ...]
    draining: bool
    subscription_ratio: float
    #: GPU devices committed to a batch job, by job id (``JobGpusRequested``).
    jobs: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: Its host pool (None: in no pool).
    pool: str | None = None

    @property
    def committed_gpus(self) -> int:
        return sum(len(devices) for _, devices in (*self.bound, *self.jobs))

    @property
    def idle_gpus(self) -> int:
        return len(self.gpu_devices) - self.committed_gpus

    @property
    def free_devices(self) -> list[int]:
        """The device indices no replica or job holds, in order."""
        bound = {d for _, devices in (*self.bound, *self.jobs) for d in devices}
        return [d for d in self.gpu_devices if d not in bound]


@dataclass(frozen=True, slots=True)
class KernelView:
    kernel_id: str
    request: Resources
    policy: str
    #: ``(replica_id, host)`` of every placed replica.
    replicas: tuple[tuple[str, str], ...]
    binding: Binding | None
    #: Terms of this kernel's cells waiting for GPUs, oldest first.
    waiting: tuple[int, ...]
    #: The host pool its replicas run in (None: any host).
    pool: str | None = None
    #: The only hosts its replicas may run on (None: any host).
    hosts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    """What the auto-scaler looks at (see :func:`scaling_decision`)."""

    hosts: int
    gpu_capacity: int
    committed_gpus: int
    pending_gpus: int
    waiting_cells: int
    #: Hosts with no replica placed on them, in name order.
    idle_hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceMemoryView:
    """One GPU of a host and its memory, in bytes (``Scheduler.device_memory``)."""

    device: int
    capacity: int
    #: The share of the cell bound here (its kernel's ``KERNEL_VRAM_GB`` / its GPUs).
    committed: int
    #: ``((kernel_id, replica_id), bytes)`` that replicas keep here between cells.
    held: tuple[tuple[tuple[str, str], int], ...]
    #: The holder an eviction in flight was sent to.
    evicting: tuple[str, str] | None = None

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size in self.held)


@dataclass(frozen=True, slots=True)
class EvictionWait:
    """What a cell waited for before it started (``BindGpus.evicted``): memory moved off
    ``devices`` (by another kernel's replica when ``others``, else by its own replica)."""

    devices: tuple[int, ...]
    freed_bytes: int
    #: The longest of the evictions it waited for, as the gateway measured them.
    seconds: float
    others: bool
