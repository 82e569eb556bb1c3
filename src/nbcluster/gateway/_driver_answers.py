"""What the scheduler driver (``_driver``) answers: the values its requests return and what
carrying out a list of the scheduler's actions leaves for the caller who asked.

:meth:`SchedulerDriver.place_kernel` and ``place_replica`` return a :class:`Placement` or a
:class:`Refusal` (the kernel manager's modules launch the replicas or report the error);
``migrate`` a :class:`MigrationResult` or a :class:`Refusal` (the operator's migration API).
:class:`Answers` is what ``carry_out`` collects on the way. Plain values, no behaviour.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..scheduling import BindGpus, BindJobGpus, Evict, Migrate, PlaceReplicas, ScaleOut
from ._driver_collaborators import EvictionResult

__all__ = ["Answers", "MigrationResult", "Placement", "Refusal"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the scheduler put a kernel's replicas: ``(replica_id, host)`` each."""

    kernel_id: str
    replicas: tuple[tuple[str, str], ...]
    #: GPUs the kernel holds for its life (``reservation``), else None.
    reserved_devices: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """The scheduler said no; ``reason`` is the user-facing error. ``scaling``: the host
    provider was asked for hosts, so a later attempt may succeed."""

    reason: str
    scaling: bool = False
    #: The hosts it may use have no room now (a later attempt may succeed), whether or not
    #: hosts were asked for (a pooled kernel asks for none: "Host pools" in scheduling.md).
    full: bool = False


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A requested migration that was carried out (``ok``) or failed (see the log)."""

    migrate: Migrate
    ok: bool
    seconds: float


@dataclass(slots=True)
class Answers:
    """What carrying out a list of actions leaves for the caller who asked."""

    placed: PlaceReplicas | None = None
    #: A life-long binding (``reservation``): the replica is launched with these devices.
    reserved: BindGpus | None = None
    job: BindJobGpus | None = None
    #: The reason of a ``RejectKernel``, ``MigrationRefused`` or ``JobGpusRefused``.
    refusal: str | None = None
    #: The ``RejectKernel`` said the hosts are full now (not that no host could ever do).
    full: bool = False
    scale_out: ScaleOut | None = None
    #: Migrations started, each with its running task (True: it succeeded).
    migrations: list[tuple[Migrate, asyncio.Task[bool]]] = field(default_factory=list)
    #: Evictions started, each with its running task.
    evictions: list[tuple[Evict, asyncio.Task[EvictionResult]]] = field(default_factory=list)
