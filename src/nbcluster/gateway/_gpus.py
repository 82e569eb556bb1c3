"""GPU scheduling at the gateway: the pure :class:`~nbcluster.scheduling.Scheduler` fed with
what happens, and its decisions carried out on real kernels.

The kernel manager owns one :class:`GpuScheduling`. It reports hosts and replicas coming and
going, kernels starting and stopping (``handle``); every kernel reports its cells through the
:class:`~._kernel.ExecutionGate` methods. The actions that concern a cell (bind, wait, cancel,
migrate) are carried out here; placement and refusals go back to the caller, who asked.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..hostproto import HostResources
from ..scheduling import (
    Action,
    BindGpus,
    CancelWait,
    Event,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    Migrate,
    PlaceReplicas,
    ReleaseGpus,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleOut,
    Scheduler,
    SchedulerConfig,
    WaitForGpus,
)
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics

__all__ = ["GpuScheduling", "host_spec", "new_replica_id"]

log = logging.getLogger(__name__)

#: A cell whose migrations failed this many times stops trying and waits for its own hosts.
_MIGRATION_ATTEMPTS = 2


def new_replica_id(kernel_id: str, number: int) -> str:
    """Replica ids unique across kernel restarts and gateway restarts (host daemons and log
    files are keyed by them)."""
    return f"{kernel_id[:8]}-{secrets.token_hex(3)}"


def host_spec(resources: HostResources) -> tuple[Resources, tuple[int, ...]]:
    """What the scheduler knows of a host, from what its daemon reported."""
    spec = Resources(
        gpus=len(resources.gpus),
        millicpus=resources.cpus * 1000,
        memory_mb=resources.memory_mb,
        vram_gb=round(sum(g.memory_mb for g in resources.gpus) / 1024, 3),
    )
    return spec, tuple(g.index for g in resources.gpus)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class GpuScheduling:
    """Created by the kernel manager; every kernel's ``gate``. Runs on the gateway's loop."""

    def __init__(
        self,
        kernels: Mapping[str, GatewayKernel],
        metrics: GatewayMetrics,
        max_subscription_ratio: float,
        replicas_per_kernel: int,
    ) -> None:
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_subscription_ratio=max_subscription_ratio,
                replicas_per_kernel=replicas_per_kernel,
                new_replica_id=new_replica_id,
            )
        )
        self.kernels = kernels
        self.metrics = metrics
        #: Carries out a migration (start, catch up, retire); True when it succeeded. Set by
        #: the kernel manager.
        self.migrate: Callable[[Migrate], Awaitable[bool]] | None = None
        #: Asks the auto-scaler for hosts. Set by the gateway when it has a host provider.
        self.scale_out: Callable[[ScaleOut], None] | None = None
        self._wait_started: dict[tuple[str, int], float] = {}
        self._migrating: set[str] = set()
        self._failed_migrations: dict[tuple[str, int], int] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- events -------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event, carry out what concerns cells, return every action."""
        actions = self.scheduler.handle(event)
        self._carry_out(actions)
        return actions

    def place_replica(self, kernel_id: str, holding: str | None = None) -> tuple[str, str] | None:
        """Place one more replica of a kernel (the gateway restoring its replica count):
        ``(replica_id, host)``, or None when no host has room (an auto-scaler is asked).

        ``holding``: the replica of the kernel's last failed attempt, whose placement was kept
        so that the scheduler, which never puts two replicas of a kernel on one host, picks
        another host now. It is released here: after the new placement, or before placing
        again when no other host has room (then the same host is tried again).
        """
        actions = self.scheduler.handle(ReplicaRequested(kernel_id))
        if holding is not None:
            released = self.scheduler.handle(ReplicaStopped(kernel_id, holding, rerun=False))
            if not any(isinstance(a, PlaceReplicas) for a in actions):
                # Only the host that failed has room: it is tried again. The scale-out the
                # first request asked for is dropped (nothing was carried out yet).
                actions = self.scheduler.handle(ReplicaRequested(kernel_id))
            actions = released + actions
        self._carry_out(actions)
        place = next((a for a in actions if isinstance(a, PlaceReplicas)), None)
        if place is None:
            return None
        [(replica_id, host)] = place.replicas
        return replica_id, host

    def execution_requested(self, kernel: GatewayKernel, term: int, preferred: str | None) -> None:
        self.handle(ExecutionRequested(kernel.id, term, preferred))

    def execution_finished(self, kernel: GatewayKernel, term: int) -> None:
        self._failed_migrations.pop((kernel.id, term), None)
        self._end_wait(kernel.id, term)
        self.handle(ExecutionFinished(kernel.id, term))

    def execution_cancelled(self, kernel: GatewayKernel, term: int) -> None:
        self.handle(ExecutionCancelled(kernel.id, term))

    # -- actions ------------------------------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        for index, action in enumerate(actions):
            match action:
                case BindGpus(term=int()) if action.replica_id in self._migrating:
                    pass  # dispatched by the migration once the replica has caught up
                case BindGpus(term=int()):
                    self._dispatch(action)
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
                    self._start_migration(action, bind)
                case ScaleOut():
                    if self.scale_out is not None:
                        self.scale_out(action)
                    else:
                        log.info("would scale out by %d host(s): %s", action.count, action.reason)
                case ReleaseGpus() if action.device_indices:
                    log.debug(
                        "kernel %s released GPUs %s on %s",
                        action.kernel_id,
                        action.device_indices,
                        action.host,
                    )
                case _:
                    pass  # placement and refusals: the caller handles them

    def _dispatch(self, bind: BindGpus) -> None:
        assert bind.term is not None
        kernel = self.kernels.get(bind.kernel_id)
        if kernel is None:
            return
        waited = self._end_wait(bind.kernel_id, bind.term)
        if waited is not None and bind.device_indices:
            devices = ", ".join(map(str, bind.device_indices))
            kernel.cell_started_after_wait(
                bind.term,
                f"[nbcluster] Got {_plural(len(bind.device_indices), 'GPU')} ({devices}) on "
                f"{bind.host} after {waited:.1f} s; running the cell.\n",
            )
        if not kernel.dispatch(bind.term, bind.replica_id, bind.device_indices):
            # The cell was answered meanwhile (or its replica is gone): free what it holds.
            self.handle(ExecutionFinished(bind.kernel_id, bind.term))

    def _announce_wait(self, wait: WaitForGpus) -> None:
        if wait.behind_own_cell:
            return  # an ordinary queued cell, as on any Jupyter kernel
        kernel = self.kernels.get(wait.kernel_id)
        if kernel is None:
            return
        summary = self.scheduler.summary()
        self._wait_started.setdefault((wait.kernel_id, wait.term), time.monotonic())
        self.metrics.cells_waiting_total.inc()
        if wait.gpus == 0:
            text = (
                f"[nbcluster] Waiting for a replica: {wait.reason}. The cell runs as soon as "
                "one is back; interrupt the kernel to cancel.\n"
            )
        else:
            text = (
                f"[nbcluster] Waiting for {_plural(wait.gpus, 'GPU')}: {wait.reason} "
                f"({summary.committed_gpus} of {summary.gpu_capacity} GPUs in the cluster are "
                "in use). The cell runs as soon as they are free; interrupt the kernel to "
                "cancel.\n"
            )
        kernel.show_waiting(wait.term, text)

    def _cancel(self, cancel: CancelWait) -> None:
        self._end_wait(cancel.kernel_id, cancel.term)
        kernel = self.kernels.get(cancel.kernel_id)
        if kernel is not None:
            kernel.cancel_waiting(
                cancel.term, "KeyboardInterrupt", "interrupted while waiting for GPUs"
            )

    def _end_wait(self, kernel_id: str, term: int) -> float | None:
        started = self._wait_started.pop((kernel_id, term), None)
        if started is None:
            return None
        waited = time.monotonic() - started
        self.metrics.gpu_wait.observe(waited)
        return waited

    # -- migration ----------------------------------------------------------------------------

    def _start_migration(self, migrate: Migrate, bind: BindGpus | None) -> None:
        self._migrating.add(migrate.new_replica_id)
        task = asyncio.get_running_loop().create_task(self._migrate(migrate, bind))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _migrate(self, migrate: Migrate, bind: BindGpus | None) -> None:
        started = time.monotonic()
        ok = False
        try:
            if self.migrate is not None:
                ok = await self.migrate(migrate)
        except Exception:
            log.exception("migration of replica %s failed", migrate.replica_id)
        finally:
            self._migrating.discard(migrate.new_replica_id)
        self.metrics.migrations.labels("ok" if ok else "failed").inc()
        if ok:
            self.metrics.migration_seconds.observe(time.monotonic() - started)
            if bind is not None:
                self._dispatch(bind)
            return
        if bind is None or bind.term is None:
            return
        # The manager has already told the scheduler that the new replica is gone (its claim
        # and the cell's binding are free). Ask again: another host, or a wait.
        key = (bind.kernel_id, bind.term)
        self._failed_migrations[key] = self._failed_migrations.get(key, 0) + 1
        kernel = self.kernels.get(bind.kernel_id)
        if kernel is None:
            return
        if self._failed_migrations[key] >= _MIGRATION_ATTEMPTS:
            self._failed_migrations.pop(key, None)
            kernel.cancel_waiting(
                bind.term,
                "GpuUnavailable",
                f"no replica's host has {_plural(len(bind.device_indices), 'free GPU')} and "
                f"moving a replica to host {bind.host} failed {_MIGRATION_ATTEMPTS} times; "
                "see the gateway log. Run the cell again.",
            )
            self.handle(ExecutionFinished(bind.kernel_id, bind.term))
            return
        self.handle(ExecutionRequested(bind.kernel_id, bind.term, None))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
