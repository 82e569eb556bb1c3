"""Auto-scaling: NotebookOS's capacity rule (``scaling_decision``) run every interval, and
reactive scale-out when a kernel or a cell finds no room, carried out by a host provider.

The gateway creates an :class:`Autoscaler` when it is given a host provider and a
``max_hosts`` above 0. Only hosts the provider started are ever scaled in; hosts started by
hand (or by ``nbcluster up``) stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from .._tasks import BackgroundTasks
from ..notices import NoticeKind, Severity
from ..scheduling import (
    HostRemoved,
    ScaleIn,
    ScaleOut,
    ScalingConfig,
    scaling_decision,
)
from ._driver import SchedulerDriver, host_added
from ._hosts import HostRegistry
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._provider import HostProvider, HostProviderError, MachineHostProvider

__all__ = ["Autoscaler"]

log = logging.getLogger(__name__)


class Autoscaler:
    """Owned by the gateway, which hands the scheduler driver's ``ScaleOut``/``ScaleIn`` and
    the kernel manager's waits for hosts to it (``Gateway.request_hosts`` and friends)."""

    def __init__(
        self,
        provider: HostProvider,
        scheduling: SchedulerDriver,
        hosts: HostRegistry,
        metrics: GatewayMetrics,
        config: ScalingConfig,
        interval: float,
        startup_grace: float = 10.0,
        notifier: Notifier | None = None,
    ) -> None:
        self.provider = provider
        self.notifier = notifier if notifier is not None else Notifier()
        self.scheduling = scheduling
        self.hosts = hosts
        self.metrics = metrics
        self.config = config
        self.interval = interval
        #: Rounds start this long after the gateway: hosts started with it (``nbcluster up``,
        #: or hosts reconnecting after a gateway restart) register first.
        self.startup_grace = startup_grace
        #: Hosts launched that have not registered yet, with when they were launched.
        self._starting: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._arrived = asyncio.Event()
        self._background = BackgroundTasks("auto-scaler", log)

    # -- the periodic round ---------------------------------------------------------------------

    async def run(self) -> None:
        """Scaling rounds until cancelled (the gateway's lifetime)."""
        await asyncio.sleep(self.startup_grace)
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round()
            except Exception:
                log.exception("auto-scaling round failed")

    async def round(self) -> ScaleOut | ScaleIn | None:
        """One NotebookOS ``ValidateCapacity`` round; returns what it decided."""
        self._forget_arrived()
        summary = self.scheduling.summary()
        summary = dataclasses.replace(
            summary,
            hosts=summary.hosts + len(self._starting),
            gpu_capacity=summary.gpu_capacity + len(self._starting) * self.config.gpus_per_host,
            # Only the provider's hosts can go: the others must not take their turns.
            idle_hosts=tuple(h for h in summary.idle_hosts if self.provider.owns(h)),
        )
        decision = scaling_decision(summary, self.config)
        if isinstance(decision, ScaleOut):
            await self._scale_out(decision.count, decision.reason)
        elif isinstance(decision, ScaleIn):
            await self._scale_in(decision)
        return decision

    # -- reactive -------------------------------------------------------------------------------

    def request(self, action: ScaleOut) -> None:
        """The scheduler found no room (a kernel, a replica or a cell): add hosts now."""
        self._background.spawn(
            "scale out", self._scale_out(action.count, action.reason, action.among)
        )

    def release(self, action: ScaleIn) -> None:
        """Stop these idle hosts now (those the provider started and that are still idle)."""
        self._background.spawn("scale in", self._scale_in(action))

    async def wait_for_hosts(self, timeout: float) -> bool:
        """After a reactive scale-out: wait until a launched host registers (True) or none is
        coming (False). The kernel manager then places the kernel again."""
        await asyncio.sleep(0)  # let a scale-out requested just now launch its hosts
        async with self._lock:
            expected = set(self._starting)
        deadline = time.monotonic() + timeout
        # Checked against the registry, not consumed: every waiter hears of an arrival.
        while not any(name in self.hosts.hosts for name in expected):
            expected &= set(self._starting) | set(self.hosts.hosts)
            remaining = deadline - time.monotonic()
            if not expected or remaining <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.1))
        return True

    def host_registered(self, name: str) -> None:
        """Called by the kernel manager on every hello."""
        if name in self._starting:
            self._arrived.set()

    # -- carrying out ---------------------------------------------------------------------------

    def _forget_arrived(self) -> int:
        arrived = [n for n in self._starting if n in self.hosts.hosts]
        for name in arrived:
            del self._starting[name]
        # A host that never registered within a minute is given up on.
        stale = [n for n, t in self._starting.items() if time.monotonic() - t > 60]
        for name in stale:
            log.warning("host %s was started but never registered", name)
            del self._starting[name]
        return len(arrived)

    async def _scale_out(
        self, count: int, reason: str, among: frozenset[str] | None = None
    ) -> None:
        async with self._lock:
            self._forget_arrived()
            # Hosts being started already will do (of these names, if named): asked again by
            # the kernel manager's next try, or by the next round, it must not start more.
            count -= len(self._starting) if among is None else len(among & set(self._starting))
            if count <= 0:
                return
            # A host of the provider that is down for a moment (a container the engine
            # restarts, a Swarm task being replaced) still counts: it comes back by itself.
            present = len(
                {h.name for h in self.hosts.connected()}
                | set(self._starting)
                | set(self.provider.started())
            )
            count = min(count, self.config.max_hosts - present)
            if count <= 0:
                log.info("cannot scale out (%s): at the maximum of %d hosts", reason, present)
                return
            try:
                if among is None:
                    names = await self.provider.start_hosts(count)
                elif isinstance(self.provider, MachineHostProvider):
                    names = await self.provider.start_hosts_among(count, among)
                else:
                    raise HostProviderError(
                        f"the {self.provider.name} host provider cannot start named hosts "
                        f"({', '.join(sorted(among))})"
                    )
            except HostProviderError as exc:
                self.metrics.scale_events.labels("out", "failed").inc()
                self._notify("scale_failed", "error", f"scale-out by {count} host(s) failed: {exc}")
                return
            now = time.monotonic()
            for name in names:
                self._starting[name] = now
            self.metrics.scale_events.labels("out", "ok").inc(len(names))
            self._notify("scale_out", "info", f"scaling out by {', '.join(names)}: {reason}")

    async def _scale_in(self, decision: ScaleIn) -> None:
        async with self._lock:
            for name in decision.hosts:
                if not self.provider.owns(name):
                    continue
                view = self.scheduling.host_view(name)
                if view is None or view.replicas or view.bound or view.jobs:
                    continue
                # Out of the scheduler first, so that nothing is placed there meanwhile.
                self.scheduling.handle(HostRemoved(name))
                try:
                    await self.provider.stop_host(name)
                except HostProviderError as exc:
                    self.metrics.scale_events.labels("in", "failed").inc()
                    self._notify("scale_failed", "error", f"scale-in of {name} failed: {exc}")
                    entry = self.hosts.hosts.get(name)
                    if entry is not None and entry.state == "connected":
                        # Still there and serving: give it back to the scheduler.
                        self.scheduling.handle(host_added(name, entry.resources))
                    continue
                self.hosts.forget(name)
                self.metrics.scale_events.labels("in", "ok").inc()
                self._notify("scale_in", "info", f"scaled in {name}: {decision.reason}")

    def _notify(self, kind: NoticeKind, severity: Severity, message: str) -> None:
        self.notifier.notify(kind, severity, "cluster", message, logger=log)

    async def close(self) -> None:
        await self._background.close()
        await self.provider.close()
