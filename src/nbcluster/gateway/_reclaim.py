"""Idle reclamation (``--reclaim-idle-after``): a replicated kernel idle for longer has its
state checkpointed and its replicas released (their hosts' resources and the scheduler's
claims freed); the kernel stays, ``idle`` to its clients, and its next message restores it on
new replicas (``GatewayKernel``'s ``on_wake``, which is :meth:`IdleReclaimer.wake`)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from ..scheduling import KernelStopped
from ._config import GatewayConfig
from ._driver import SchedulerDriver
from ._errors import CheckpointError, KernelUnavailable
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._recovery import Recovery, Spawn, serving
from ._replicas import Replicas
from ._state import StateStore

__all__ = ["IdleReclaimer"]

log = logging.getLogger(__name__)


class IdleReclaimer:
    """Owned by the kernel manager; the gateway runs :meth:`run` when reclamation is on."""

    def __init__(
        self,
        config: GatewayConfig,
        kernels: dict[str, GatewayKernel],
        state_store: StateStore,
        metrics: GatewayMetrics,
        scheduling: SchedulerDriver,
        replicas: Replicas,
        recovery: Recovery,
        spawn: Spawn,
        notifier: Notifier | None = None,
    ) -> None:
        self._config = config
        self._notifier = notifier if notifier is not None else Notifier()
        self._kernels = kernels
        self._state_store = state_store
        self._metrics = metrics
        self._scheduling = scheduling
        self._replicas = replicas
        self._recovery = recovery
        self._spawn = spawn

    async def run(self) -> None:
        """Every few seconds (started by the gateway when ``reclaim_idle_after`` is set):
        replicated kernels idle for longer release their replicas and claims."""
        limit = self._config.reclaim_idle_after
        assert limit is not None
        while True:
            await asyncio.sleep(min(max(limit / 4, 0.2), 5.0))
            now = datetime.now(UTC)
            for kernel in list(self._kernels.values()):
                idle_for = (now - kernel.last_activity).total_seconds()
                if (
                    idle_for > limit
                    and kernel.record.replica_count > 1
                    and not kernel.record.reclaimed
                    and kernel.execution_state == "idle"
                    and not kernel.executions
                    and not kernel.pending
                    and serving(kernel)
                ):
                    await self._reclaim(kernel, idle_for)

    async def _reclaim(self, kernel: GatewayKernel, idle_for: float) -> None:
        try:
            await self._recovery.checkpoint(kernel)
        except (CheckpointError, KernelUnavailable, TimeoutError) as exc:
            log.warning("kernel %s stays placed: no checkpoint (%s)", kernel.id, exc)
            return
        async with kernel.lifecycle_lock:
            if kernel.executions or kernel.pending or kernel.execution_state != "idle":
                return  # it was used meanwhile
            self._metrics.reclaims.inc()
            self._scheduling.handle(KernelStopped(kernel.id))
            # Its links go first (``reclaim``): the replicas' last status messages must not
            # reach the clients, to whom the kernel stays idle.
            kernel.reclaim()
            await self._replicas.stop_all(kernel)
            self._state_store.save(kernel.record)
        self._notifier.notify(
            "kernel_reclaimed",
            "info",
            f"kernel/{kernel.id}",
            f"kernel {kernel.id} was idle for {idle_for:.0f} s: its replicas were released "
            "(state checkpointed)",
            owner=kernel.record.owner,
            kernel_id=kernel.id,
            logger=log,
        )

    def wake(self, kernel: GatewayKernel) -> None:
        """A message arrived for a reclaimed kernel: restore it (the message is held)."""
        self._spawn(
            self._recovery.restore_kernel(
                kernel,
                "it was idle",
                headline="This kernel's replicas were released while it was idle; it was "
                "restored on new ones",
            )
        )
