"""What the gateway tells the scheduler: one frozen dataclass per fact.

The gateway (later: a workload simulator) builds these from what it observes: host
registrations and resource reports, kernel creation, ``execute_request`` / ``execute_reply``,
interrupts, replica deaths, and passes each to :meth:`Scheduler.handle`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._resources import Resources

__all__ = [
    "DeviceMemoryReported",
    "Event",
    "EvictionFinished",
    "ExecutionCancelled",
    "ExecutionFinished",
    "ExecutionRequested",
    "HostAdded",
    "HostDrainRequested",
    "HostRemoved",
    "HostResourcesChanged",
    "JobGpusReleased",
    "JobGpusRequested",
    "KernelAdopted",
    "KernelRequested",
    "KernelStopped",
    "MigrationRequested",
    "ReplicaAdopted",
    "ReplicaReady",
    "ReplicaRequested",
    "ReplicaStopped",
    "UserQuotaSet",
]


@dataclass(frozen=True, slots=True)
class HostAdded:
    """A host registered (a known name is treated as ``HostResourcesChanged``).

    ``gpu_devices`` are the device indices (empty: ``0 .. spec.gpus - 1``); their count must
    equal ``spec.gpus``, else :meth:`Scheduler.handle` raises ``ValueError``. ``device_vram``:
    each device's memory in bytes, in the same order (empty: ``spec.vram_gb`` shared evenly).
    ``pool``: the host pool it belongs to (None: none; only kernels without a pool go there)."""

    name: str
    spec: Resources
    gpu_devices: tuple[int, ...] = ()
    device_vram: tuple[int, ...] = ()
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class HostRemoved:
    """A host left (or died): its replicas and bindings are forgotten."""

    name: str


@dataclass(frozen=True, slots=True)
class HostResourcesChanged:
    """A host reported new resources; one that shrinks below its bindings is drained.

    ``pool`` replaces the host's pool; replicas already there stay (they are not moved)."""

    name: str
    spec: Resources
    gpu_devices: tuple[int, ...] = ()
    device_vram: tuple[int, ...] = ()
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class HostDrainRequested:
    """An operator drains a host (``POST /api/cluster/hosts/{name}/drain``) or, with
    ``draining=False``, undrains it (``DELETE``). A draining host takes no new replica,
    migration, cell binding or job; what runs there keeps running. An unknown host is ignored
    (the gateway checks first). A host that shrank below its bindings stays draining."""

    name: str
    draining: bool = True


@dataclass(frozen=True, slots=True)
class KernelRequested:
    """``POST /api/kernels``: place ``replicas`` replicas (None: the policy's count)."""

    kernel_id: str
    request: Resources
    replicas: int | None = None
    policy: str = "notebookos"
    #: The user it belongs to (their GPU quota bounds its cells: ``UserQuotaSet``).
    owner: str = ""
    #: The host pool its replicas must run in (None: any host, pooled or not).
    pool: str | None = None
    #: The only hosts its replicas may run on (None: any host): a kernelspec's
    #: ``remote_hosts``, as the host provider names their daemons. A kernel confined to hosts
    #: that have not registered yet is not refused as too big; its ``ScaleOut`` names them.
    hosts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ReplicaRequested:
    """Place one more replica of a kernel (the gateway replaces a dead one)."""

    kernel_id: str


@dataclass(frozen=True, slots=True)
class KernelAdopted:
    """A kernel that already exists (a restarted gateway restored it), with no replica known
    yet: its cells wait until ``ReplicaAdopted`` brings one. Known ids are ignored."""

    kernel_id: str
    request: Resources
    policy: str = "notebookos"
    owner: str = ""
    pool: str | None = None
    hosts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ReplicaReady:
    """A replica placed by ``ReplicaRequested`` has joined its group and caught up: from now
    on it may execute cells (replicas placed with their kernel, adopted or migrated to are
    ready from the start)."""

    kernel_id: str
    replica_id: str


@dataclass(frozen=True, slots=True)
class ReplicaAdopted:
    """A replica that already runs on ``host`` (the gateway restarted and found it there).

    Its claim is added without the subscription cap: it exists whatever the cap says. The
    first adopted replica of an unknown kernel creates it with ``request`` and ``policy``;
    ``reserved_devices`` re-creates a life-long binding (``reservation``) on those devices.
    A replica on an unknown host is ignored (adopt it when that host registers)."""

    kernel_id: str
    replica_id: str
    host: str
    request: Resources
    policy: str = "notebookos"
    reserved_devices: tuple[int, ...] | None = None
    #: The kernel's host pool and hosts (used when this replica creates the kernel).
    pool: str | None = None
    hosts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ReplicaStopped:
    """A replica exited, was retired or failed to start: its claims are released.

    ``rerun``: the cell it was executing (if it held a binding for one) runs again elsewhere,
    ahead of every waiting cell (it was running already); the scheduler binds it at once if it
    can, else queues it first. False: the caller decides (a failed migration, for instance)."""

    kernel_id: str
    replica_id: str
    rerun: bool = True


@dataclass(frozen=True, slots=True)
class ExecutionRequested:
    """An ``execute_request`` for ``term`` arrived; ``preferred_replica`` ran the last cell.
    ``gpus``: how many GPUs this cell needs when it says (``%%cpu``: 0), else the kernel's
    request."""

    kernel_id: str
    term: int
    preferred_replica: str | None = None
    gpus: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionFinished:
    """The ``execute_reply`` of ``term`` arrived (ok, error or aborted)."""

    kernel_id: str
    term: int


@dataclass(frozen=True, slots=True)
class ExecutionCancelled:
    """The user interrupted ``term``: a waiting cell leaves the queue (``CancelWait``).

    A bound cell keeps its GPUs until its ``execute_reply`` (``ExecutionFinished``)."""

    kernel_id: str
    term: int


@dataclass(frozen=True, slots=True)
class MigrationRequested:
    """An operator asked to move a replica (to ``to_host``, or wherever fits best)."""

    kernel_id: str
    replica_id: str
    to_host: str | None = None


@dataclass(frozen=True, slots=True)
class KernelStopped:
    """The kernel was shut down: every claim it holds is released."""

    kernel_id: str


@dataclass(frozen=True, slots=True)
class JobGpusRequested:
    """A GPU job was assigned to ``host`` with these devices (free in the scheduler's
    ``HostView.free_devices`` when the job manager looked): commit them to the job until
    ``JobGpusReleased``, or refuse (``JobGpusRefused``) if they are not all free now.

    Like a replica, the job's GPUs count as a pending claim on its host (without the
    subscription cap: the devices are free, so the job runs)."""

    job_id: str
    host: str
    device_indices: tuple[int, ...]
    #: The job's owner: its GPUs count against their quota while it holds them.
    owner: str = ""


@dataclass(frozen=True, slots=True)
class UserQuotaSet:
    """``user`` may hold at most ``gpus`` GPUs at once across their cells and jobs (None: no
    limit). A cell that would pass it waits, like a cell for which no host has GPUs, until the
    user's other cells or jobs release theirs."""

    user: str
    gpus: int | None


@dataclass(frozen=True, slots=True)
class JobGpusReleased:
    """The job ended, was requeued or cancelled: its devices are free again (waiting cells
    get them first). An unknown job id is ignored."""

    job_id: str


@dataclass(frozen=True, slots=True)
class DeviceMemoryReported:
    """After a cell, ``replica_id`` keeps ``held`` bytes per physical device of its host
    (tensors left in the namespace); it replaces what it reported before. Unknown replicas
    and devices are ignored."""

    kernel_id: str
    replica_id: str
    held: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvictionFinished:
    """The answer to an ``Evict`` of these devices: ``ok`` (the memory is freed), or not
    (an error, a timeout, no such replica: ``error`` says which); ``freed_bytes`` and
    ``seconds`` as the replica and the gateway measured them."""

    kernel_id: str
    replica_id: str
    device_indices: tuple[int, ...]
    ok: bool
    freed_bytes: int = 0
    seconds: float = 0.0
    error: str = ""


Event = (
    HostAdded
    | HostRemoved
    | HostResourcesChanged
    | HostDrainRequested
    | KernelRequested
    | KernelAdopted
    | ReplicaAdopted
    | ReplicaReady
    | ReplicaRequested
    | ReplicaStopped
    | ExecutionRequested
    | ExecutionFinished
    | ExecutionCancelled
    | MigrationRequested
    | KernelStopped
    | JobGpusRequested
    | JobGpusReleased
    | DeviceMemoryReported
    | EvictionFinished
    | UserQuotaSet
)
