"""Keeping a kernel alive when its replicas go: replace, migrate, restore, checkpoint.

* A replica is lost (:meth:`Recovery.replica_lost`, told by ``_reconcile``): its cells run
  again on another replica (the kernel does that), and a repair loop (one per kernel,
  :meth:`Recovery.ensure_repair`) starts replacements until the kernel has its configured
  number of replicas again, retrying with backoff (``_repair.RetryPolicy``).
* The scheduler moves a replica (``Migrate``, carried out by :meth:`Recovery.move_replica` for
  the driver, and for an operator's ``migrate``): the new one joins, the old one retires.
* Every replica is gone: a replicated kernel is restored from the object store on new
  replicas (:meth:`Recovery.restore_kernel`); one of a single replica is dead.
* :meth:`Recovery.checkpoint` has a replica write the kernel's state to the store now.

The Raft side of each change is ``_membership``'s; starting and stopping processes is
``_replicas``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from ..notices import NoticeKind, Severity
from ..protocol import CheckpointReply, CheckpointRequest, ControlErrorReply, RestorePoint
from ..scheduling import KernelStopped, Migrate, ReplicaReady, ReplicaStopped
from ._control import control_request
from ._driver import Refusal, SchedulerDriver
from ._errors import CheckpointError, KernelStartError, MigrationError
from ._kernel import GatewayKernel
from ._membership import Membership
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._repair import RepairStatus, RetryPolicy
from ._replicas import Replicas
from ._state import ReplicaRecord, StateStore

__all__ = ["Recovery", "Spawn", "restore_notice", "serving"]

log = logging.getLogger(__name__)

#: Runs a coroutine in the background, owned (and cancelled on close) by the kernel manager.
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


def serving(kernel: GatewayKernel) -> bool:
    """Whether a replica that can run cells is left (a replacement still catching up
    cannot)."""
    return any(r.state in ("running", "unknown") for r in kernel.record.replicas)


class Recovery:
    """Owned by the kernel manager; it is the scheduler driver's ``ReplicaMover`` (through
    the manager) and the reconciliation's answer to every lost replica."""

    def __init__(
        self,
        kernels: dict[str, GatewayKernel],
        state_store: StateStore,
        metrics: GatewayMetrics,
        scheduling: SchedulerDriver,
        replicas: Replicas,
        membership: Membership,
        spawn: Spawn,
        policy: RetryPolicy | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._kernels = kernels
        self._notifier = notifier if notifier is not None else Notifier()
        self._state_store = state_store
        self._metrics = metrics
        self._scheduling = scheduling
        self._replicas = replicas
        self._membership = membership
        self._spawn = spawn
        #: Backoff and per-attempt bound of replacements; one repair loop per kernel.
        self.policy = policy if policy is not None else RetryPolicy()
        self._repairs: dict[str, asyncio.Task[None]] = {}
        #: Set (and replaced) when a host registers: repair loops waiting out a backoff wake.
        self._host_arrived = asyncio.Event()

    # -- a replica is gone --------------------------------------------------------------------

    def replica_lost(self, kernel: GatewayKernel, replica: ReplicaRecord, reason: str) -> None:
        """``replica`` of ``kernel`` is gone (exited, its host lost ...): its cells run again
        elsewhere and a replacement is started, or the kernel is restored (none left)."""
        replica.state = "dead"
        replica.reason = reason
        self._notify(
            kernel,
            "replica_lost",
            "warning",
            f"kernel {kernel.id}: replica {replica.replica_id} on {replica.host} was lost: {reason}",
        )
        kernel.drop_link(replica.replica_id)
        stopped = ReplicaStopped(kernel.id, replica.replica_id)
        if serving(kernel):
            # The scheduler frees the replica's GPUs once the kernel has marked its cell to
            # run again, so that the cell is re-bound first.
            kernel.on_replica_lost(
                replica.replica_id, reason, release=lambda: self._scheduling.handle(stopped)
            )
            self.ensure_repair(kernel)
        else:
            self._scheduling.handle(stopped)
            self.lost_everything(kernel, reason)
        self._state_store.save(kernel.record)

    def _notify(
        self,
        kernel: GatewayKernel,
        kind: NoticeKind,
        severity: Severity,
        message: str,
        seconds: float | None = None,
    ) -> None:
        self._notifier.notify(
            kind,
            severity,
            f"kernel/{kernel.id}",
            message,
            owner=kernel.record.owner,
            kernel_id=kernel.id,
            seconds=seconds,
            logger=log,
        )

    # -- repair: back to the configured number of replicas ------------------------------------

    def ensure_repair(self, kernel: GatewayKernel) -> None:
        """Start the kernel's repair loop unless it runs already: one per kernel, so that
        attempts never overlap (each also holds the kernel's lifecycle lock)."""
        if kernel.record.replica_count <= 1:
            return
        task = self._repairs.get(kernel.id)
        if task is not None and not task.done():
            return
        self._repairs[kernel.id] = self._spawn(self._repair(kernel))

    def wake_repairs(self) -> None:
        """A host registered: repair loops waiting out a backoff try again now."""
        self._host_arrived.set()
        self._host_arrived = asyncio.Event()

    def needs_replica(self, kernel: GatewayKernel) -> bool:
        """Whether the kernel should get another replica now. Not once it is gone, dead,
        being restarted or restored (which start every replica anew), or reclaimed; nor
        while no replica is confirmed running (with none left it is restored from the store
        instead)."""
        return (
            self._kernels.get(kernel.id) is kernel
            and not kernel.is_dead
            and kernel.execution_state != "restarting"
            and not kernel.record.reclaimed
            # A confirmed replica to change the membership through (after a gateway restart,
            # the host hello that confirms one starts the repair).
            and any(r.state == "running" for r in kernel.record.replicas)
            and len(kernel.live_replicas()) < kernel.record.replica_count
        )

    async def _repair(self, kernel: GatewayKernel) -> None:
        """Replace lost replicas until the kernel has its configured number again, retrying
        failed attempts with backoff (``policy``) on another host when there is one.
        Runs in the background; the kernel keeps serving meanwhile."""
        policy = self.policy
        status = RepairStatus()
        kernel.repair_started(status)
        #: The scheduler's placement of the last failed attempt, kept until the next attempt
        #: is placed, so that the scheduler avoids that host if it can (``place_replica``).
        held: str | None = None
        try:
            while True:
                wake = self._host_arrived
                async with kernel.lifecycle_lock:
                    if not self.needs_replica(kernel):
                        return
                    status.attempting, status.retry_at = True, None
                    try:
                        why, held = await self._replace_once(kernel, held, policy.attempt_timeout)
                    except Exception as exc:
                        # A bug must not end the loop and leave the kernel degraded for good.
                        log.exception("kernel %s: replacement attempt failed", kernel.id)
                        why = f"{type(exc).__name__}: {exc}"
                    finally:
                        status.attempting = False
                if why is None:
                    status.failed_attempts, status.last_error = 0, ""
                    continue  # another one may be missing
                status.failed_attempts += 1
                # The API shows its start (a replica's log tail can follow the reason).
                status.last_error = why if len(why) <= 500 else why[:499] + "…"
                self._metrics.replacement_failures.inc()
                delay = policy.delay(status.failed_attempts)
                status.retry_at = datetime.now(UTC) + timedelta(seconds=delay)
                self._notify(
                    kernel,
                    "replacement_failed",
                    "warning",
                    f"kernel {kernel.id} runs degraded on {kernel.serving_replicas} of "
                    f"{kernel.record.replica_count} replicas: replacement attempt "
                    f"{status.failed_attempts} failed ({why}); retrying in {delay:.1f} s",
                )
                if not serving(kernel) and not kernel.is_dead:
                    # The others died while it tried: restore the kernel from the object store.
                    self.lost_everything(kernel, f"every replica was lost ({why})")
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
        finally:
            if held is not None:
                self._scheduling.handle(ReplicaStopped(kernel.id, held, rerun=False))
            kernel.repair_ended(status)
            if self._repairs.get(kernel.id) is asyncio.current_task():
                del self._repairs[kernel.id]

    async def _replace_once(
        self, kernel: GatewayKernel, held: str | None, timeout: float
    ) -> tuple[str | None, str | None]:
        """One replacement attempt (the caller holds the lifecycle lock). Returns why it
        failed (None: it succeeded) and the failed attempt's placement, still held."""
        placed = self._scheduling.place_replica(kernel.id, held)
        if isinstance(placed, Refusal):
            return "no host has room for another replica", None
        [(replica_id, host)] = placed.replicas
        started = time.monotonic()
        new, why = await self._membership.swap_in(kernel, host, replica_id, timeout)
        self._state_store.save(kernel.record)
        if new is None:
            return f"replica {replica_id} on {host}: {why}", replica_id
        self._scheduling.handle(ReplicaReady(kernel.id, replica_id))
        self._metrics.replacements.observe(time.monotonic() - started)
        self._notify(
            kernel,
            "replica_replaced",
            "info",
            f"kernel {kernel.id}: replica {new.replica_id} on {host} joined in "
            f"{time.monotonic() - started:.2f} s ({kernel.serving_replicas} of "
            f"{kernel.record.replica_count} replicas running)",
            seconds=time.monotonic() - started,
        )
        return None, None

    # -- migration ----------------------------------------------------------------------------

    async def move_replica(self, migrate: Migrate) -> bool:
        """Carry out a scheduler ``Migrate``: the new replica joins, the old one retires.

        Called by the scheduler driver (``ReplicaMover``), for a cell that needs GPUs
        elsewhere or for :meth:`migrate`. On failure the scheduler is told what runs where
        again."""
        kernel = self._kernels.get(migrate.kernel_id)
        if kernel is None:
            return False
        async with kernel.lifecycle_lock:
            old = kernel.replica(migrate.replica_id)
            if self._kernels.get(kernel.id) is not kernel or old is None or old.state != "running":
                self._scheduling.handle(
                    ReplicaStopped(kernel.id, migrate.new_replica_id, rerun=False)
                )
                return False
            started = time.monotonic()
            self._notify(
                kernel,
                "migration_started",
                "info",
                f"kernel {kernel.id}: moving replica {old.replica_id} from {migrate.from_host} "
                f"to {migrate.to_host}",
            )
            # The old replica retires first: pysyncobj's leader refuses to remove itself, and
            # the old one may be the leader. The group commits on 2 of 3 meanwhile.
            await self._replicas.stop(kernel, old)
            old.reason = f"migrating to {migrate.to_host}"
            new, why = await self._membership.swap_in(
                kernel, migrate.to_host, migrate.new_replica_id, self.policy.attempt_timeout
            )
            if new is None:
                self._notify(
                    kernel,
                    "migration_failed",
                    "error",
                    f"kernel {kernel.id}: migration of replica {old.replica_id} to "
                    f"{migrate.to_host} failed: {why}",
                    seconds=time.monotonic() - started,
                )
                # Its cell is asked for again by the scheduler driver (bounded attempts).
                self._scheduling.handle(
                    ReplicaStopped(kernel.id, migrate.new_replica_id, rerun=False)
                )
                self.replica_lost(kernel, old, f"migration to {migrate.to_host} failed: {why}")
                self._state_store.save(kernel.record)
                return False
            old.reason = f"migrated to {migrate.to_host} as {new.replica_id}"
            self._state_store.save(kernel.record)
            self._notify(
                kernel,
                "migration_finished",
                "info",
                f"kernel {kernel.id}: replica {old.replica_id} moved from {migrate.from_host} "
                f"to {migrate.to_host} as {new.replica_id} in {time.monotonic() - started:.2f} s",
                seconds=time.monotonic() - started,
            )
            return True

    async def migrate(
        self, kernel: GatewayKernel, replica_id: str, to_host: str | None
    ) -> dict[str, Any]:
        """An operator's migration of one replica, now (carried out as a cell's would be)."""
        if kernel.is_dead:
            raise MigrationError(f"kernel {kernel.id} is dead: {kernel.record.dead_reason}")
        # The driver carries it out (``move_replica``) and counts it in the metrics.
        result = await self._scheduling.migrate(kernel.id, replica_id, to_host)
        if isinstance(result, Refusal):
            raise MigrationError(result.reason)
        migrate, seconds = result.migrate, result.seconds
        if not result.ok:
            raise MigrationError(
                f"replica {replica_id} could not move to {migrate.to_host}; see the gateway log"
            )
        return {
            "kernel_id": kernel.id,
            "replica_id": replica_id,
            "new_replica_id": migrate.new_replica_id,
            "from_host": migrate.from_host,
            "to_host": migrate.to_host,
            "seconds": round(seconds, 3),
        }

    # -- every replica is gone ----------------------------------------------------------------

    def lost_everything(self, kernel: GatewayKernel, reason: str) -> None:
        if kernel.is_dead or kernel.execution_state == "restarting":
            return
        if kernel.record.replica_count > 1:
            # Its state is in the object store: new replicas rebuild it.
            self._notify(
                kernel,
                "kernel_restoring",
                "error",
                f"kernel {kernel.id} lost every replica ({reason}); restoring it",
            )
            kernel.begin_restore(reason)
            self._spawn(self.restore_kernel(kernel, reason))
        else:
            self._notify(kernel, "kernel_dead", "error", f"kernel {kernel.id} is dead: {reason}")
            kernel.mark_dead(reason)
            self._scheduling.handle(KernelStopped(kernel.id))

    async def restore_kernel(
        self, kernel: GatewayKernel, reason: str, headline: str | None = None
    ) -> None:
        """Start new replicas that rebuild the kernel from the store's checkpoint and log
        tail; messages sent meanwhile are held. Dead, with the reason, if nothing is stored."""
        started = time.monotonic()
        async with kernel.lifecycle_lock:
            if self._kernels.get(kernel.id) is not kernel:
                return
            self._scheduling.handle(KernelStopped(kernel.id))
            for leftover in kernel.live_replicas():
                await self._replicas.stop(kernel, leftover)
            try:
                replies = await self._membership.launch_group(kernel, restore=True)
                restored = [r.restored for r in replies if r.restored is not None]
                if not restored or len(restored) < len(replies):
                    raise KernelStartError("the object store holds no checkpoint of it")
                point = min(restored, key=lambda r: r.term)
            except KernelStartError as exc:
                await self._replicas.stop_all(kernel)
                self._scheduling.handle(KernelStopped(kernel.id))
                kernel.mark_dead(f"{reason}; it could not be restored: {exc}")
                kernel.end_restart()
                self._state_store.save(kernel.record)
                self._notify(
                    kernel,
                    "kernel_dead",
                    "error",
                    f"kernel {kernel.id} could not be restored: {exc}",
                )
                return
            if point.refused:  # forged or altered objects in the store (docs/security.md)
                self._metrics.state_refused.inc(len(point.refused))
            kernel.end_restore(point.term, restore_notice(reason, point, headline))
            self._state_store.save(kernel.record)
            self._metrics.restores.observe(time.monotonic() - started)
            self._notify(
                kernel,
                "kernel_restored",
                "warning",
                f"kernel {kernel.id} restored from its checkpoint to term {point.term} in "
                f"{time.monotonic() - started:.2f} s",
                seconds=time.monotonic() - started,
            )

    # -- checkpoints --------------------------------------------------------------------------

    async def checkpoint(self, kernel: GatewayKernel) -> dict[str, Any]:
        """A replica writes the kernel's state to the object store now (on its control channel, so
        a running cell does not delay it)."""
        running = [r for r in kernel.record.replicas if r.state == "running"]
        if kernel.is_dead or not running:
            raise CheckpointError(f"kernel {kernel.id} has no running replica to checkpoint")
        if kernel.record.replica_count < 2:
            raise CheckpointError(
                f"kernel {kernel.id} runs one replica: checkpoints need a replicated kernel"
            )
        replica = next((r for r in running if r.replica_id != kernel.executor), running[0])
        body = await control_request(
            kernel,
            kernel.links[replica.replica_id],
            "control",
            CheckpointRequest(after_term=kernel.last_replied_term),
            CheckpointReply,
            120.0,
        )
        if isinstance(body, ControlErrorReply):
            raise CheckpointError(f"the checkpoint failed: {body.evalue}")
        return {
            "kernel_id": kernel.id,
            "term": body.term,
            "execution_count": body.execution_count,
            "created": datetime.fromtimestamp(body.created, UTC).isoformat(),
            "size": body.size,
            "replica_id": replica.replica_id,
        }


def restore_notice(reason: str, point: RestorePoint, headline: str | None = None) -> str:
    """What the next cell of a restored kernel shows: from what, up to which cell."""
    created = point.checkpoint_created
    when = (
        f"its checkpoint of {datetime.fromtimestamp(created, UTC):%Y-%m-%d %H:%M:%S} UTC"
        if created
        else "the store's log"
    )
    later = point.later_cells
    tail = f" and {later} later cell(s)" if later else ""
    count = point.execution_count
    refused = (
        f"[nbcluster] the object store held {len(point.refused)} object(s) of this kernel that "
        "failed authentication or their checksum (forged, altered or damaged); they were not "
        f"loaded: {', '.join(point.refused)}\n"
        if point.refused
        else ""
    )
    if headline is not None:
        return f"[nbcluster] {headline} from {when}{tail}, up to cell [{count}].\n{refused}"
    return (
        f"[nbcluster] This kernel lost all its replicas ({reason}) and was restored from "
        f"{when}{tail}, up to cell [{count}]. Variables set by cells after that are lost.\n"
        f"{refused}"
    )
