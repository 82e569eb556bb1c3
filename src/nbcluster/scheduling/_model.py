"""The scheduler's configuration and its mutable records of hosts, kernels and waiting cells.

:class:`._state.Scheduler` creates these records and keeps them; its helpers (``_hosts``,
``_binding``, ``_placement``, ``_waiting``, ``_jobs``) read and change them. They live here,
apart from all of those, so that the helpers share the types without importing each other
or the scheduler. Callers outside the scheduler never see them: they get the frozen
``_views`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._confinement import Confinement
from ._policies import Policy
from ._resources import Resources
from ._views import Binding, KernelView

__all__ = ["Host", "Kernel", "SchedulerConfig", "Wait", "numbered_replica_id"]


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
class Host:
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
    #: The ``HostIndex.by_free`` bucket this host sits in (None: not indexed).
    free_bucket: int | None = None

    def load_key(self) -> tuple[float, int, str]:
        claims = len(self.replicas) + len(self.jobs)
        return (self.pending.gpus / max(self.spec.gpus, 1), claims, self.name)


@dataclass(slots=True)
class Kernel:
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

    def view(self) -> KernelView:
        return KernelView(
            self.kernel_id,
            self.request,
            self.policy.name,
            tuple(self.replicas.items()),
            self.binding,
            tuple(self.waiting),
            self.pool,
            self.hosts,
        )


@dataclass(frozen=True, slots=True)
class Wait:
    kernel_id: str
    term: int
    preferred: str | None
    #: the cell's own GPU count (``%%cpu``: 0), None: the kernel's request
    gpus: int | None = None
    #: Its place in the queue: waits are served in ascending ``seq`` (appended cells count
    #: up from 1, cells put back at the head count down from 0).
    seq: int = 0
