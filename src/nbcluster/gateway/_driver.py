"""The one driver of the pure scheduler: events in, every decision carried out here.

:class:`~nbcluster.scheduling.Scheduler` decides (events in, actions out, no I/O);
:class:`SchedulerDriver` is the only code that feeds it and the only code that interprets its
actions (:meth:`SchedulerDriver.carry_out`, one ``match`` over every action type, an unknown
one raises). The kernel manager owns it; callers go through its methods:

* facts (``handle``): hosts and replicas coming and going, kernels stopping;
* requests that have an answer, returned as a value: :meth:`~SchedulerDriver.place_kernel`
  and :meth:`~SchedulerDriver.place_replica` (:class:`Placement` or :class:`Refusal`),
  :meth:`~SchedulerDriver.migrate` (:class:`MigrationResult` or :class:`Refusal`),
  :meth:`~SchedulerDriver.reserve_job_gpus` / :meth:`~SchedulerDriver.release_job_gpus`;
* cells (the :class:`~._kernel.ExecutionGate` methods every kernel calls): bind, wait,
  cancel, migrate-then-run;
* read-only views for the API, metrics, jobs and the auto-scaler (``summary``,
  ``host_views``, ``host_view``, ``kernel_view``, ``waiting``).

Its collaborators come in its constructor as protocols (``_driver_collaborators``); moves
and evictions run in ``_replica_moves`` (every ``Evict`` gets one ``EvictionFinished``, also
a failed one). Its answers are in ``_driver_answers``, waiting cells' texts in
``_cell_wait_texts``, host specs and replica ids in ``_scheduler_terms`` (all re-exported).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .._tasks import BackgroundTasks
from ..scheduling import (
    Action,
    BindGpus,
    BindJobGpus,
    CancelWait,
    ClusterSummary,
    DeviceMemoryReported,
    DeviceMemoryView,
    Event,
    Evict,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostDrainRequested,
    HostView,
    JobGpusRefused,
    JobGpusReleased,
    JobGpusRequested,
    KernelRequested,
    KernelView,
    Migrate,
    MigrationRefused,
    MigrationRequested,
    PlaceReplicas,
    RefuseCell,
    RejectKernel,
    ReleaseGpus,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleIn,
    ScaleOut,
    Scheduler,
    SchedulerConfig,
    UserQuotaSet,
    WaitForGpus,
)
from ..simulation import RecordingScheduler, recording_scheduler
from ._cell_wait_texts import (
    evicted_text,
    granted_text,
    migration_failed_text,
    waited_notice,
    waiting_text,
)
from ._driver_answers import Answers, MigrationResult, Placement, Refusal
from ._driver_collaborators import (
    CellRunner,
    EvictionResult,
    Evictor,
    HostRequester,
    HostSupply,
    ReplicaMover,
)
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._replica_moves import run_eviction, run_migration
from ._scheduler_terms import host_added, host_spec, new_replica_id

__all__ = [
    "Answers",
    "CellRunner",
    "EvictionResult",
    "Evictor",
    "HostRequester",
    "HostSupply",
    "MigrationResult",
    "Placement",
    "Refusal",
    "ReplicaMover",
    "SchedulerDriver",
    "host_added",
    "host_spec",
    "new_replica_id",
]

log = logging.getLogger(__name__)

#: A cell whose migrations failed this many times stops trying and waits for its own hosts.
_MIGRATION_ATTEMPTS = 2

#: Events whose answer the caller needs: they have their own methods, not ``handle``.
_ANSWERED = {
    KernelRequested: "place_kernel",
    ReplicaRequested: "place_replica",
    MigrationRequested: "migrate",
    JobGpusRequested: "reserve_job_gpus",
}


class SchedulerDriver:
    """Created and owned by the kernel manager; every kernel's ``gate``. Runs on the gateway's
    loop."""

    def __init__(
        self,
        cells: Mapping[str, CellRunner],
        metrics: GatewayMetrics,
        *,
        max_subscription_ratio: float,
        replicas_per_kernel: int,
        mover: ReplicaMover | None = None,
        hosts: HostRequester | None = None,
        evictor: Evictor | None = None,
        gpu_quota_of: Callable[[str], int | None] | None = None,
        notifier: Notifier | None = None,
        record: Path | None = None,
    ) -> None:
        self._notifier = notifier if notifier is not None else Notifier()
        #: Each kernel's owner as its last cell said (whom a cell's wait notice is for).
        self._owners: dict[str, str] = {}
        config = SchedulerConfig(
            max_subscription_ratio=max_subscription_ratio,
            replicas_per_kernel=replicas_per_kernel,
            new_replica_id=new_replica_id,
        )
        #: ``record``: every event given to the scheduler and its decisions go to that file
        #: (``nbcluster gateway --record``; ``nbcluster simulate`` replays it).
        self._recording: RecordingScheduler | None = (
            None if record is None else recording_scheduler(config, record)
        )
        self._scheduler = self._recording or Scheduler(config)
        self._cells = cells
        self._metrics = metrics
        self._mover = mover
        self._hosts = hosts
        self._evictor = evictor
        self._wait_started: dict[tuple[str, int], float] = {}
        #: New replicas of migrations under way, with the binding to run once they are up.
        self._migrating: dict[str, BindGpus | None] = {}
        self._failed_migrations: dict[tuple[str, int], int] = {}
        self._background = BackgroundTasks("scheduler driver", log)
        #: Users' GPU quotas as the identities say now, and as the scheduler was last told.
        self._gpu_quota_of = gpu_quota_of
        self._quotas_told: dict[str, int | None] = {}

    def _tell_quota(self, user: str) -> None:
        """Tell the scheduler ``user``'s GPU quota if it changed since it was last told (the
        users file can change while the gateway runs): before their kernel is placed and
        before each of their cells asks for GPUs."""
        if self._gpu_quota_of is None or not user:
            return
        quota = self._gpu_quota_of(user)
        if self._quotas_told.get(user, None) != quota or user not in self._quotas_told:
            self._quotas_told[user] = quota
            self.carry_out(self._scheduler.handle(UserQuotaSet(user, quota)))

    # -- views --------------------------------------------------------------------------------

    def summary(self) -> ClusterSummary:
        return self._scheduler.summary()

    def host_views(self) -> Mapping[str, HostView]:
        return self._scheduler.hosts

    def host_view(self, name: str) -> HostView | None:
        return self._scheduler.host(name)

    def kernel_view(self, kernel_id: str) -> KernelView | None:
        return self._scheduler.kernel(kernel_id)

    @property
    def waiting(self) -> tuple[tuple[str, int], ...]:
        """Cells waiting for GPUs, ``(kernel_id, term)``, in queue order."""
        return self._scheduler.waiting

    @property
    def parked(self) -> tuple[tuple[str, int], ...]:
        """Bound cells waiting for evictions, ``(kernel_id, term)``."""
        return self._scheduler.parked

    def device_memory(self, host: str) -> tuple[DeviceMemoryView, ...]:
        return self._scheduler.device_memory(host)

    # -- facts --------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """Apply a fact (a host came or went, a replica stopped, a kernel stopped ...) and
        carry out what follows. Requests that have an answer have their own methods."""
        method = _ANSWERED.get(type(event))
        if method is not None:
            raise TypeError(f"{type(event).__name__} has an answer: call {method}() instead")
        self.carry_out(self._scheduler.handle(event))

    def drain_host(self, name: str, draining: bool) -> bool:
        """An operator drains (or undrains) a host (``POST``/``DELETE
        /api/cluster/hosts/{name}/drain``); False when the scheduler knows no such host.
        Undraining may bind waiting cells at once, drained hosts' cells bind elsewhere."""
        if self._scheduler.host(name) is None:
            return False
        self.carry_out(self._scheduler.handle(HostDrainRequested(name, draining)))
        return True

    # -- requests with an answer --------------------------------------------------------------

    def place_kernel(
        self,
        kernel_id: str,
        request: Resources,
        replicas: int | None,
        policy: str,
        owner: str = "",
        pool: str | None = None,
        hosts: frozenset[str] | None = None,
    ) -> Placement | Refusal:
        """Where a new (or restarted, or restored) kernel's replicas go (only on hosts of
        ``pool`` and among ``hosts``, if set)."""
        self._tell_quota(owner)
        actions = self._scheduler.handle(
            KernelRequested(kernel_id, request, replicas, policy, owner, pool, hosts)
        )
        return self._placement(kernel_id, self.carry_out(actions))

    def place_replica(self, kernel_id: str, holding: str | None = None) -> Placement | Refusal:
        """Place one more replica of a kernel (the gateway restoring its replica count).

        ``holding``: the replica of the kernel's last failed attempt, whose placement was kept
        so that the scheduler, which never puts two replicas of a kernel on one host, picks
        another host now. It is released here: after the new placement, or before placing
        again when no other host has room (then the same host is tried again).
        """
        actions = self._scheduler.handle(ReplicaRequested(kernel_id))
        if holding is not None:
            released = self._scheduler.handle(ReplicaStopped(kernel_id, holding, rerun=False))
            if not any(isinstance(a, PlaceReplicas) for a in actions):
                # Only the host that failed has room: it is tried again. The scale-out the
                # first request asked for is dropped (nothing was carried out yet).
                actions = self._scheduler.handle(ReplicaRequested(kernel_id))
            actions = released + actions
        return self._placement(kernel_id, self.carry_out(actions))

    @staticmethod
    def _placement(kernel_id: str, answers: Answers) -> Placement | Refusal:
        placed, reserved, scale_out = answers.placed, answers.reserved, answers.scale_out
        if placed is None:
            reason = answers.refusal or (scale_out.reason if scale_out else "no host has room")
            return Refusal(reason, scaling=scale_out is not None, full=answers.full)
        devices = reserved.device_indices if reserved is not None else None
        return Placement(kernel_id, placed.replicas, devices)

    async def migrate(
        self, kernel_id: str, replica_id: str, to_host: str | None
    ) -> MigrationResult | Refusal:
        """An operator's migration: carried out now (the same way as a cell's)."""
        answers = self.carry_out(
            self._scheduler.handle(MigrationRequested(kernel_id, replica_id, to_host))
        )
        if not answers.migrations:
            return Refusal(answers.refusal or f"replica {replica_id} cannot move now")
        [(migrate, task)] = answers.migrations
        started = time.monotonic()
        ok = await task
        return MigrationResult(migrate, ok, time.monotonic() - started)

    def reserve_job_gpus(
        self, job_id: str, host: str, devices: tuple[int, ...], owner: str = ""
    ) -> bool:
        """Commit these devices of ``host`` to a batch job of ``owner``; False: they are not
        all free."""
        answers = self.carry_out(
            self._scheduler.handle(JobGpusRequested(job_id, host, devices, owner))
        )
        return answers.job is not None

    def release_job_gpus(self, job_id: str) -> None:
        """The job is over (or requeued): its devices go to waiting cells first."""
        self.carry_out(self._scheduler.handle(JobGpusReleased(job_id)))

    # -- cells (ExecutionGate) ----------------------------------------------------------------

    # (On every cell's path: straight to the scheduler, without ``handle``'s check.)

    def execution_requested(
        self, kernel: GatewayKernel, term: int, preferred: str | None, gpus: int | None = None
    ) -> None:
        self._tell_quota(kernel.record.owner)
        self._owners[kernel.id] = kernel.record.owner
        self.carry_out(self._scheduler.handle(ExecutionRequested(kernel.id, term, preferred, gpus)))

    def execution_finished(self, kernel: GatewayKernel, term: int) -> None:
        self._failed_migrations.pop((kernel.id, term), None)
        self._end_wait(kernel.id, term)
        self.carry_out(self._scheduler.handle(ExecutionFinished(kernel.id, term)))

    def execution_cancelled(self, kernel: GatewayKernel, term: int) -> None:
        self.handle(ExecutionCancelled(kernel.id, term))

    def device_memory_reported(
        self, kernel: GatewayKernel, replica_id: str, held: Mapping[int, int]
    ) -> None:
        self.carry_out(self._scheduler.handle(DeviceMemoryReported(kernel.id, replica_id, held)))

    # -- the interpreter ----------------------------------------------------------------------

    def carry_out(self, actions: Sequence[Action]) -> Answers:
        """Carry out the scheduler's actions in order; return what the asking caller needs.

        Every action type of :mod:`nbcluster.scheduling` has its case; anything else raises
        ``TypeError`` (a new action must be given its meaning here)."""
        answers = Answers()
        for index, action in enumerate(actions):
            match action:  # the actions of every cell first
                case BindGpus(term=None):
                    answers.reserved = action  # the replica is launched with them
                case BindGpus() if action.replica_id in self._migrating:
                    # Dispatched by the migration once the replica has caught up.
                    self._migrating[action.replica_id] = action
                case BindGpus():
                    self._dispatch(action)
                case ReleaseGpus():
                    if action.device_indices:
                        log.debug("released: %s", action)
                case PlaceReplicas():
                    answers.placed = action  # the caller launches them
                case RejectKernel() | MigrationRefused() | JobGpusRefused():
                    answers.refusal = action.reason
                    answers.full = isinstance(action, RejectKernel) and action.full
                case WaitForGpus():
                    self._announce_wait(action)
                case CancelWait():
                    self._cancel(action)
                case Migrate():
                    bind = next(
                        (
                            a
                            for a in actions[index + 1 :]
                            if isinstance(a, BindGpus) and a.replica_id == action.new_replica_id
                        ),
                        None,
                    )
                    answers.migrations.append((action, self._start_migration(action, bind)))
                case ScaleOut():
                    answers.scale_out = action
                    if self._hosts is not None:
                        self._hosts.request_hosts(action)
                    else:
                        log.info("would scale out by %d host(s): %s", action.count, action.reason)
                case ScaleIn():
                    if self._hosts is not None:
                        self._hosts.release_hosts(action)
                    else:
                        log.info("would scale in %s: %s", ", ".join(action.hosts), action.reason)
                case BindJobGpus():
                    answers.job = action
                    log.debug("bound: %s", action)
                case Evict():
                    answers.evictions.append((action, self._start_eviction(action)))
                case RefuseCell():
                    self._end_wait(action.kernel_id, action.term)
                    cell = self._cells.get(action.kernel_id)
                    if cell is not None:
                        cell.cancel_waiting(action.term, "GpuUnavailable", action.reason)
                case _:
                    raise TypeError(
                        f"the scheduler driver cannot carry out {action!r}: not an action of "
                        "nbcluster.scheduling (give it a case in SchedulerDriver.carry_out)"
                    )
        return answers

    def _dispatch(self, bind: BindGpus) -> None:
        assert bind.term is not None
        kernel = self._cells.get(bind.kernel_id)
        if kernel is None:
            return
        waited = self._end_wait(bind.kernel_id, bind.term)
        if bind.evicted is not None:
            kernel.show_waiting(bind.term, evicted_text(bind.evicted))
        if waited is not None and bind.device_indices:
            kernel.cell_started_after_wait(bind.term, granted_text(bind, waited))
            self._notifier.notify(
                "cell_waited",
                "info" if waited < 60 else "warning",
                f"kernel/{bind.kernel_id}",
                waited_notice(bind, waited),
                owner=self._owners.get(bind.kernel_id),
                kernel_id=bind.kernel_id,
                seconds=waited,
                logger=log,
            )
        if not kernel.dispatch(bind.term, bind.replica_id, bind.device_indices):
            # The cell was answered meanwhile (or its replica is gone): free what it holds.
            self.handle(ExecutionFinished(bind.kernel_id, bind.term))

    def _announce_wait(self, wait: WaitForGpus) -> None:
        if wait.behind_own_cell:
            return  # an ordinary queued cell, as on any Jupyter kernel
        kernel = self._cells.get(wait.kernel_id)
        if kernel is None:
            return
        summary = self._scheduler.summary()
        self._wait_started.setdefault((wait.kernel_id, wait.term), time.monotonic())
        self._metrics.cells_waiting_total.inc()
        kernel.show_waiting(wait.term, waiting_text(wait, summary))

    def _cancel(self, cancel: CancelWait) -> None:
        self._end_wait(cancel.kernel_id, cancel.term)
        kernel = self._cells.get(cancel.kernel_id)
        if kernel is not None:
            kernel.cancel_waiting(
                cancel.term, "KeyboardInterrupt", "interrupted while waiting for GPUs"
            )

    def _end_wait(self, kernel_id: str, term: int) -> float | None:
        started = self._wait_started.pop((kernel_id, term), None)
        if started is None:
            return None
        waited = time.monotonic() - started
        self._metrics.gpu_wait.observe(waited)
        return waited

    # -- migration ----------------------------------------------------------------------------

    def _start_migration(self, migrate: Migrate, bind: BindGpus | None) -> asyncio.Task[bool]:
        self._migrating[migrate.new_replica_id] = bind
        return self._background.spawn(
            f"migrate replica {migrate.replica_id}", self._migrate(migrate, bind)
        )

    async def _migrate(self, migrate: Migrate, bind: BindGpus | None) -> bool:
        """Have the replica moved (``_replica_moves``), then run the cell that waited for it,
        or ask again for it (another host, or a wait) when the move failed."""
        try:
            ok = await run_migration(self._mover, migrate, self._metrics)
        finally:
            # A cell parked for an eviction on the target is bound while it moves.
            bind = self._migrating.pop(migrate.new_replica_id, bind)
        if ok:
            if bind is not None:
                self._dispatch(bind)
            return True
        if bind is None or bind.term is None:
            return False
        # The mover has already told the scheduler that the new replica is gone (its claim
        # and the cell's binding are free). Ask again: another host, or a wait.
        key = (bind.kernel_id, bind.term)
        self._failed_migrations[key] = self._failed_migrations.get(key, 0) + 1
        kernel = self._cells.get(bind.kernel_id)
        if kernel is None:
            return False
        if self._failed_migrations[key] >= _MIGRATION_ATTEMPTS:
            self._failed_migrations.pop(key, None)
            kernel.cancel_waiting(
                bind.term, "GpuUnavailable", migration_failed_text(bind, _MIGRATION_ATTEMPTS)
            )
            self.handle(ExecutionFinished(bind.kernel_id, bind.term))
            return False
        self.handle(ExecutionRequested(bind.kernel_id, bind.term, None))
        return False

    # -- eviction -----------------------------------------------------------------------------

    def _start_eviction(self, evict: Evict) -> asyncio.Task[EvictionResult]:
        return self._background.spawn(
            f"evict GPU memory of replica {evict.replica_id}", self._evict(evict)
        )

    async def _evict(self, evict: Evict) -> EvictionResult:
        """Ask the replica (``_replica_moves``), then tell the scheduler what happened (unless the
        gateway is closing: a cancelled eviction is not answered)."""
        result, finished = await run_eviction(self._evictor, evict, self._metrics)
        self.carry_out(self._scheduler.handle(finished))
        return result

    async def close(self) -> None:
        await self._background.close()
        if self._recording is not None:
            self._recording.close()
