"""What the scheduler asks the gateway to do: one frozen dataclass per decision.

:meth:`Scheduler.handle` returns a list of these; the gateway carries them out in order
(start replicas, refuse a kernel, set ``CUDA_VISIBLE_DEVICES`` for a cell, migrate a
replica, show a waiting message, ask the host provider for hosts).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._views import EvictionWait

__all__ = [
    "Action",
    "BindGpus",
    "BindJobGpus",
    "CancelWait",
    "Evict",
    "JobGpusRefused",
    "Migrate",
    "MigrationRefused",
    "PlaceReplicas",
    "RefuseCell",
    "RejectKernel",
    "ReleaseGpus",
    "ScaleIn",
    "ScaleOut",
    "WaitForGpus",
]


@dataclass(frozen=True, slots=True)
class PlaceReplicas:
    """Start these replicas (``(replica_id, host)``) of a kernel."""

    kernel_id: str
    replicas: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RejectKernel:
    """Refuse the kernel at creation; ``reason`` is the user-facing error. ``full``: the hosts
    it may use have no room now (a later attempt may succeed), as opposed to a request no host
    could ever take. (A refusal with a ``ScaleOut`` is one of those too.)"""

    kernel_id: str
    reason: str
    full: bool = False


@dataclass(frozen=True, slots=True)
class BindGpus:
    """``replica_id`` on ``host`` executes ``term`` with these GPU devices.

    ``term`` is None for a binding that lasts the kernel's life (``reservation``).
    ``evicted``: the cell waited for memory to be moved off GPUs first (``Evict``)."""

    kernel_id: str
    term: int | None
    replica_id: str
    host: str
    device_indices: tuple[int, ...]
    evicted: EvictionWait | None = None


@dataclass(frozen=True, slots=True)
class ReleaseGpus:
    """The binding of ``term`` (None: the life-long one) is over; the devices are free."""

    kernel_id: str
    term: int | None
    replica_id: str
    host: str
    device_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Migrate:
    """Replace ``replica_id`` on ``from_host`` by ``new_replica_id`` on ``to_host`` (start the
    new one, let it catch up through a Raft membership change, retire the old one).

    The scheduler has already moved the claim to the new replica; a ``BindGpus`` for
    ``new_replica_id`` on ``to_host`` follows in the same list when a cell waits for it."""

    kernel_id: str
    replica_id: str
    from_host: str
    to_host: str
    new_replica_id: str


@dataclass(frozen=True, slots=True)
class MigrationRefused:
    """A requested migration cannot happen; ``reason`` is the operator-facing error."""

    kernel_id: str
    replica_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class WaitForGpus:
    """No host can give ``term`` its GPUs now: the cell waits (tell the user why).

    ``behind_own_cell``: it only waits for the kernel's previous cell, as any queued cell of a
    Jupyter kernel does; not worth a message. If, once that cell is done, no GPU is free, a
    second ``WaitForGpus`` for the same term comes with ``behind_own_cell`` False."""

    kernel_id: str
    term: int
    gpus: int
    reason: str
    behind_own_cell: bool = False


@dataclass(frozen=True, slots=True)
class CancelWait:
    """A waiting cell was interrupted and left the queue."""

    kernel_id: str
    term: int


@dataclass(frozen=True, slots=True)
class ScaleOut:
    """Ask the host provider for ``count`` more hosts; ``among``: only hosts of these names
    help (a kernel confined to a kernelspec's ``remote_hosts``), None: any new host."""

    count: int
    reason: str
    among: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ScaleIn:
    """Ask the host provider to stop these idle hosts."""

    hosts: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class BindJobGpus:
    """The job runs on ``host`` with these devices; they are committed until
    ``JobGpusReleased``."""

    job_id: str
    host: str
    device_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class JobGpusRefused:
    """The job cannot have those devices now (taken meanwhile, unknown host, or the job
    already holds GPUs); it stays queued. ``reason`` says which."""

    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Evict:
    """Ask ``replica_id`` of ``kernel_id`` on ``host`` to move what it keeps on these GPUs to
    host memory and release them; answer with ``EvictionFinished`` (always, also when it
    failed or timed out). A cell bound to those devices waits for it (docs/scheduling.md)."""

    kernel_id: str
    replica_id: str
    host: str
    device_indices: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class RefuseCell:
    """Answer a cell that never ran with an error (``GpuUnavailable``): its devices could
    not be freed. Its binding is already released."""

    kernel_id: str
    term: int
    reason: str


Action = (
    PlaceReplicas
    | RejectKernel
    | BindGpus
    | ReleaseGpus
    | Migrate
    | MigrationRefused
    | WaitForGpus
    | CancelWait
    | ScaleOut
    | ScaleIn
    | BindJobGpus
    | JobGpusRefused
    | Evict
    | RefuseCell
)
