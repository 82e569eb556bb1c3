"""What the gateway believes runs, kept in line with what the hosts say runs.

* Replica exits (from the launcher) and lost or disconnected hosts mark replicas dead and hand
  them to ``_recovery`` (:meth:`Reconciler.replica_exited`, :meth:`Reconciler.host_lost`,
  :meth:`Reconciler.host_disconnected`).
* A host's hello lists the replicas it runs (:meth:`Reconciler.host_hello`): those it does not
  list are dead, those no kernel owns are stopped by the caller, those a restarted gateway had
  not confirmed yet are running again; the scheduler learns of the host and its replicas.
* A restarted gateway re-attaches (:meth:`Reconciler.reattach`): it loads every kernel record,
  reconnects to the replicas that were running and waits for their hosts to confirm them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..hostproto import ReplicaReport
from ..scheduling import HostRemoved, KernelAdopted, ReplicaAdopted
from ._config import GatewayConfig
from ._control import replica_last_term
from ._driver import HostSupply, SchedulerDriver, host_added
from ._errors import KernelUnavailable
from ._hosts import HostEntry, HostRegistry
from ._kernel import GatewayKernel
from ._launcher import ReplicaExit
from ._membership import resource_request
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._recovery import Recovery, Spawn
from ._replicas import Replicas
from ._state import KernelRecord, StateStore

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    """Owned by the kernel manager, which passes it the host endpoint's and the launcher's
    events."""

    def __init__(
        self,
        config: GatewayConfig,
        hosts: HostRegistry,
        kernels: dict[str, GatewayKernel],
        state_store: StateStore,
        metrics: GatewayMetrics,
        scheduling: SchedulerDriver,
        replicas: Replicas,
        recovery: Recovery,
        new_kernel: Callable[[KernelRecord], GatewayKernel],
        spawn: Spawn,
        host_supply: HostSupply | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._config = config
        self._notifier = notifier if notifier is not None else Notifier()
        self._hosts = hosts
        self._kernels = kernels
        self._state_store = state_store
        self._metrics = metrics
        self._scheduling = scheduling
        self._replicas = replicas
        self._recovery = recovery
        self._new_kernel = new_kernel
        self._spawn = spawn
        self._host_supply = host_supply
        self._stopping = False

    # -- replicas and hosts going away --------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether the gateway is stopping (:meth:`begin_stop` was called)."""
        return self._stopping

    def begin_stop(self) -> None:
        """The gateway is stopping: from now on replicas and hosts that go away are the
        shutdown's doing (``nbcluster up`` stops the hosts once the gateway has gone), not
        losses to repair or report. Called by ``Gateway.begin_stop``."""
        if not self._stopping:
            log.info("gateway stopping: lost replicas and hosts are no longer recovered")
        self._stopping = True

    def replica_exited(self, exit: ReplicaExit) -> None:
        if self._stopping:
            return
        kernel = self._kernels.get(exit.kernel_id)
        replica = kernel.replica(exit.replica_id) if kernel else None
        if kernel is None or replica is None or replica.state in ("stopped", "dead"):
            return
        reason = (
            f"replica {replica.replica_id} on host {exit.host} exited with code {exit.exit_code}"
        )
        if exit.log_tail:
            log.warning("%s; end of its log:\n%s", reason, exit.log_tail)
        self._recovery.replica_lost(kernel, replica, reason)

    def host_lost(self, entry: HostEntry) -> None:
        if self._stopping:
            return
        self._metrics.hosts_lost.inc()
        self._notifier.notify(
            "host_lost",
            "error",
            f"host/{entry.name}",
            f"host {entry.name} is lost (silent for over {self._hosts.lost_timeout:.0f} s)",
            logger=log,
        )
        for kernel in list(self._kernels.values()):
            for replica in kernel.live_replicas():
                if replica.host == entry.name:
                    self._recovery.replica_lost(kernel, replica, f"host {entry.name} was lost")
        self._scheduling.handle(HostRemoved(entry.name))

    async def host_disconnected(self, entry: HostEntry) -> None:
        """A host's websocket closed. Ping its replicas' heartbeat sockets until they stop
        answering (its daemon died, taking them with it: they are declared dead at once rather
        than after the lost timeout), the host comes back, or it is declared lost. One ping is
        not enough: a dying replica can still answer for a moment after its host's socket
        closed."""
        # Nothing new goes to it meanwhile; a hello brings it and its replicas back.
        self._scheduling.handle(HostRemoved(entry.name))
        deadline = time.monotonic() + self._hosts.lost_timeout
        while time.monotonic() < deadline and not self._stopping:
            suspects = [
                (kernel, replica, link)
                for kernel in self._kernels.values()
                for replica in kernel.live_replicas()
                if replica.host == entry.name
                and (link := kernel.links.get(replica.replica_id)) is not None
            ]
            if not suspects:
                return
            answers = await asyncio.gather(*(link.ping(timeout=0.5) for _, _, link in suspects))
            current = self._hosts.hosts.get(entry.name)
            if current is None or current.state != "disconnected":
                return  # it came back, or it was declared lost (and handled) meanwhile
            for (kernel, replica, _), alive in zip(suspects, answers, strict=True):
                if not alive and replica.state in ("running", "unknown", "starting"):
                    self._recovery.replica_lost(
                        kernel,
                        replica,
                        f"host {entry.name} disconnected and its replica stopped answering",
                    )
            await asyncio.sleep(0.2)

    # -- a host (re)connects ------------------------------------------------------------------

    def host_hello(self, entry: HostEntry, reports: list[ReplicaReport]) -> list[str]:
        """Reconcile what a (re)connecting host runs with what we know.

        Returns replica ids the host runs that belong to no known kernel: the caller stops them.
        """
        if self._host_supply is not None:
            self._host_supply.host_registered(entry.name)
        try:
            self._scheduling.handle(host_added(entry.name, entry.resources))
        except ValueError as exc:
            log.error("host %s reported unusable resources: %s", entry.name, exc)
        reported = {r.replica_id: r for r in reports}
        for kernel in list(self._kernels.values()):
            for replica in kernel.live_replicas():
                if replica.host != entry.name:
                    continue
                report = reported.pop(replica.replica_id, None)
                if report is None:
                    if replica.state != "starting":
                        self._recovery.replica_lost(
                            kernel, replica, f"host {entry.name} came back without this replica"
                        )
                    continue
                if replica.state == "unknown":
                    self._replicas.adopt(kernel, replica, report.pid, report.connection)
                    self._state_store.save(kernel.record)
                if replica.state == "running":
                    reserved = kernel.record.reserved_devices
                    self._scheduling.handle(
                        ReplicaAdopted(
                            kernel.id,
                            replica.replica_id,
                            entry.name,
                            resource_request(kernel.record),
                            kernel.record.policy,
                            tuple(reserved) if reserved is not None else None,
                            kernel.record.pool,
                            kernel.record.confined_hosts,
                        )
                    )
        # A new host may take the replica that a kernel lacks (also a kernel that a restarted
        # gateway found short of replicas).
        for kernel in list(self._kernels.values()):
            if self._recovery.needs_replica(kernel):
                self._recovery.ensure_repair(kernel)
        self._recovery.wake_repairs()
        return list(reported)

    # -- gateway restart ----------------------------------------------------------------------

    def reattach(self) -> None:
        """Load persisted kernels at start-up and reconnect to their replicas' sockets."""
        for record in self._state_store.load_all():
            # Kernels started before there were users belong to the admin.
            record.owner = record.owner or self._config.admin_name
            kernel = self._new_kernel(record)
            self._kernels[record.id] = kernel
            if record.dead_reason:
                kernel.mark_dead(record.dead_reason)
                continue
            if record.reclaimed:
                kernel.started()  # idle: restored by its next message
                continue
            # Its cells wait until a host's hello brings back one of its replicas.
            self._scheduling.handle(
                KernelAdopted(
                    record.id,
                    resource_request(record),
                    record.policy,
                    record.owner,
                    record.pool,
                    record.confined_hosts,
                )
            )
            for replica in record.replicas:
                if replica.state in ("running", "starting", "unknown") and replica.connection:
                    self._replicas.relink(kernel, replica)
            if not kernel.links:
                kernel.mark_dead("no replica survived the gateway restart")
                continue
            self._spawn(self._confirm_reattached(kernel))
        if self._kernels:
            log.info("restored %d kernel(s) from %s", len(self._kernels), self._config.state_dir)
            self._spawn(self._expire_unknown_replicas(self._config.host_lost_timeout * 2))

    async def _confirm_reattached(self, kernel: GatewayKernel) -> None:
        link = kernel.executor_link()
        if link is None:
            return
        try:
            info = await kernel.wait_ready(link, self._config.host_lost_timeout * 2)
        except (TimeoutError, KernelUnavailable):
            return
        kernel.reattached(replica_last_term(kernel, info))

    async def _expire_unknown_replicas(self, delay: float) -> None:
        await asyncio.sleep(delay)
        for kernel in list(self._kernels.values()):
            for replica in kernel.live_replicas():
                if replica.state == "unknown" and self._hosts.hosts.get(replica.host) is None:
                    self._recovery.replica_lost(
                        kernel,
                        replica,
                        f"host {replica.host} did not reconnect after the gateway restarted",
                    )
