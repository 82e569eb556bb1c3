"""The gateway's kernel manager: the one object the REST API, the channels websocket and the
host endpoint call. It starts, restarts, interrupts and shuts down kernels itself, and builds
and owns the modules that do the rest:

* ``_replicas`` (:class:`Replicas`): start, stop and signal one replica through the launcher
  (``_launcher``, the host providers' seam; ``_host_launcher`` today);
* ``_membership`` (:class:`Membership`): placement and Raft group formation and changes;
* ``_recovery`` (:class:`Recovery`): replacement, migration, restore, checkpoints;
* ``_reclaim`` (:class:`IdleReclaimer`): idle reclamation;
* ``_reconcile`` (:class:`Reconciler`): replica exits, hosts lost or back, re-attaching after
  a gateway restart;
* ``_driver`` (:class:`SchedulerDriver`): the scheduler's one driver.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from .._tasks import BackgroundTasks
from ..hostproto import ReplicaExited, ReplicaReport
from ..identity import KernelTokens
from ..scheduling import DEFAULT_REQUEST, KernelStopped, Migrate, parse_request, policy_named
from ..store import ObjectStore, StoreError, open_store, tombstone_key
from ._config import GatewayConfig
from ._driver import HostSupply, SchedulerDriver
from ._errors import (
    HostProviderError,
    KernelRequestError,
    KernelStartError,
    KernelUnavailable,
    NoSuchKernel,
)
from ._evictor import ReplicaEvictor
from ._host_launcher import HostDaemonLauncher
from ._hosts import HostEntry, HostRegistry
from ._kernel import GatewayKernel
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpecRegistry
from ._launcher import LaunchError, ReplicaExit
from ._membership import Membership
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._reclaim import IdleReclaimer
from ._reconcile import Reconciler
from ._recovery import Recovery
from ._replicas import Replicas
from ._state import KernelRecord, StateStore

__all__ = ["KernelManager", "validate_env"]

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Resource requests (Enterprise Gateway convention) and the kind of number each must be.
RESOURCE_ENV = {
    "KERNEL_GPUS": int,
    "KERNEL_CPUS": float,
    "KERNEL_MEMORY_MB": float,
    "KERNEL_VRAM_GB": float,
}


#: What ``KERNEL_USERNAME`` may hold: a login or e-mail style name, no shell metacharacters.
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}")


def validate_env(
    env: Mapping[str, Any],
    max_value_bytes: int = 64 * 2**10,
    max_total_bytes: int = 512 * 2**10,
    allowed: tuple[str, ...] = (),
) -> dict[str, str]:
    """The part of a client's ``env`` that reaches the kernel: ``KERNEL_*`` variables and
    those the kernelspec's ``allowed_env`` names (a name, or a prefix followed by ``*``);
    others are dropped, as Jupyter's gateways do.

    Raises :class:`KernelRequestError` naming the first bad variable, or the limit a value
    (``max_value_bytes``, UTF-8) or all accepted variables together (``max_total_bytes``,
    names and values) are over.
    """
    accepted: dict[str, str] = {}
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise KernelRequestError(f"env: {name!r} is not a valid environment variable name")
        if not isinstance(value, str):
            raise KernelRequestError(f"env.{name}: must be a string, got {type(value).__name__}")
        if "\x00" in value:
            raise KernelRequestError(f"env.{name}: contains a NUL character")
        if name in RESOURCE_ENV:
            kind = RESOURCE_ENV[name]
            try:
                number = kind(value)
            except ValueError:
                raise KernelRequestError(
                    f"env.{name}: {value!r} is not a{'n integer' if kind is int else ' number'}"
                ) from None
            if not math.isfinite(number) or number < 0:
                raise KernelRequestError(
                    f"env.{name}: must be a finite, non-negative number, got {value!r}"
                )
        if name == "KERNEL_USERNAME" and not _USERNAME.fullmatch(value):
            # Jupyter tools put it on command lines to impersonate the user (an unquoted one
            # gave Enterprise Gateway its 2026 RCE); nbcluster never does, but a name needs no
            # shell metacharacters, so none is let through to whatever reads it later.
            raise KernelRequestError(
                f"env.KERNEL_USERNAME: {value[:80]!r} is not a user name (letters, digits and "
                ". _ @ + - only, at most 256)"
            )
        if name.startswith("KERNEL_") or _is_allowed(name, allowed):
            size = len(value.encode())
            if size > max_value_bytes:
                raise KernelRequestError(
                    f"env.{name}: {size} bytes is over the limit of {max_value_bytes} bytes "
                    "per value"
                )
            total += size + len(name)
            if total > max_total_bytes:
                raise KernelRequestError(
                    f"env: the variables passed on are over the limit of {max_total_bytes} "
                    "bytes together"
                )
            accepted[name] = value
    return accepted


def _is_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    return any(
        name.startswith(entry[:-1]) if entry.endswith("*") else name == entry for entry in allowed
    )


class KernelManager:
    """Owned by the gateway app; the REST API, the channels websocket and the host endpoint
    call into it. All methods run on the gateway's event loop."""

    def __init__(
        self,
        config: GatewayConfig,
        hosts: HostRegistry,
        specs: KernelSpecRegistry,
        state_store: StateStore,
        metrics: GatewayMetrics,
        host_supply: HostSupply | None = None,
        kernel_tokens: KernelTokens | None = None,
        gpu_quota_of: Callable[[str], int | None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        #: Where what happens to hosts and kernels is told (``_notifier``; the log too).
        self.notifier = notifier if notifier is not None else Notifier()
        self.hosts = hosts
        self.specs = specs
        self.state_store = state_store
        self.metrics = metrics
        self.kernels: dict[str, GatewayKernel] = {}
        self._background = BackgroundTasks("kernel manager", log)
        self._object_store: ObjectStore | None = None
        policy_named(config.policy)  # a bad name fails at start-up, not at the first kernel
        #: The one driver of the scheduler: every placement, binding and migration. This
        #: manager is its ``ReplicaMover`` (``move_replica``, carried out by the recovery);
        #: evictions of GPU memory go to the replicas through a ``ReplicaEvictor``.
        self.scheduling = SchedulerDriver(
            self.kernels,
            metrics,
            max_subscription_ratio=config.max_subscription_ratio,
            replicas_per_kernel=config.replicas_per_kernel,
            mover=self,
            hosts=host_supply,
            evictor=ReplicaEvictor(self.kernels),
            gpu_quota_of=gpu_quota_of,
            notifier=self.notifier,
            record=config.record,
        )
        #: Replicas are started through the host daemons; their exits come back here.
        self.launcher = HostDaemonLauncher(hosts, on_exit=self._replica_exited)
        self.replicas = Replicas(
            config,
            specs,
            self.launcher,
            kernel_tokens if kernel_tokens is not None else KernelTokens(secrets.token_bytes(32)),
        )
        self.membership = Membership(config, hosts, self.replicas, self.scheduling, host_supply)
        self._host_supply = host_supply
        self.recovery = Recovery(
            self.kernels,
            state_store,
            metrics,
            self.scheduling,
            self.replicas,
            self.membership,
            self._spawn,
            notifier=self.notifier,
        )
        self.reclaimer = IdleReclaimer(
            config,
            self.kernels,
            state_store,
            metrics,
            self.scheduling,
            self.replicas,
            self.recovery,
            self._spawn,
            notifier=self.notifier,
        )
        self.reconciler = Reconciler(
            config,
            hosts,
            self.kernels,
            state_store,
            metrics,
            self.scheduling,
            self.replicas,
            self.recovery,
            self._new_kernel,
            self._spawn,
            host_supply,
            notifier=self.notifier,
        )

    # -- lookup -------------------------------------------------------------------------------

    def get(self, kernel_id: str) -> GatewayKernel:
        try:
            return self.kernels[kernel_id]
        except KeyError:
            raise NoSuchKernel(f"no kernel with id {kernel_id}") from None

    def _new_kernel(self, record: KernelRecord) -> GatewayKernel:
        return GatewayKernel(
            record,
            gate=self.scheduling,
            on_routed=self.metrics.routed,
            on_reject=self.metrics.reject,
            on_wake=self.reclaimer.wake,
            on_executor_changed=self._executor_changed,
        )

    def _executor_changed(self, kernel: GatewayKernel, previous: str, replica_id: str) -> None:
        self.notifier.notify(
            "executor_changed",
            "info",
            f"kernel/{kernel.id}",
            f"kernel {kernel.id}: cells now run on replica {replica_id} (was {previous})",
            owner=kernel.record.owner,
            kernel_id=kernel.id,
            logger=log,
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a repair, restore or reconciliation in the background (held, its failure
        logged); the collaborators get this method in their constructors."""
        return self._background.spawn(getattr(coro, "__qualname__", "task"), coro)

    # -- start --------------------------------------------------------------------------------

    async def start_kernel(
        self, name: str | None, env: Mapping[str, Any], owner: str = ""
    ) -> GatewayKernel:
        """Start a kernel of kernelspec ``name`` for ``owner`` (the API checked that they may:
        kernelspec access and quotas)."""
        name = name or DEFAULT_KERNEL_NAME
        spec = self.specs.get(name)
        if spec is None:
            raise KernelRequestError(
                f"unknown kernelspec {name!r}; available: {', '.join(self.specs.names)}"
            )
        kernel_env = validate_env(
            env, self.config.max_env_value_bytes, self.config.max_env_bytes, spec.allowed_env
        )
        # The kernelspec's resources are defaults: what the client asks for wins.
        kernel_env = {**spec.default_resources, **kernel_env}
        try:
            request = parse_request(kernel_env, DEFAULT_REQUEST)
        except ValueError as exc:
            raise KernelRequestError(f"env.{exc}") from None
        policy = policy_named(self.config.policy)
        confined = self._remote_hosts(name, spec.remote_hosts)
        record = KernelRecord(
            id=str(uuid.uuid4()),
            name=name,
            key=secrets.token_hex(32),
            owner=owner or self.config.admin_name,
            raft_password=secrets.token_hex(16),
            env=kernel_env,
            working_dir=kernel_env.get("KERNEL_WORKING_DIR"),
            policy=policy.name,
            request=request.fields(),
            replica_count=(
                self.config.replicas_per_kernel if policy.name == "notebookos" else policy.replicas
            ),
            pool=spec.pool,
            hosts=None if confined is None else sorted(confined),
            launch_timeout=spec.launch_timeout,
        )
        kernel = self._new_kernel(record)
        self.kernels[record.id] = kernel
        started = time.monotonic()
        try:
            async with kernel.lifecycle_lock:
                await self.membership.launch_group(kernel)
        except BaseException:
            self.kernels.pop(record.id, None)
            kernel.close()
            raise
        kernel.started()
        self.state_store.save(record)
        self.metrics.kernel_start.observe(time.monotonic() - started)
        log.info("kernel %s (%s) started on %s", record.id, name, [r.host for r in record.replicas])
        return kernel

    def _remote_hosts(self, name: str, machines: tuple[str, ...]) -> frozenset[str] | None:
        """The hosts kernelspec ``name``'s kernels are confined to (its ``remote_hosts``, as
        the ssh provider names their daemons); None: it names none."""
        if not machines:
            return None
        try:
            if self._host_supply is None:
                raise HostProviderError("this gateway starts no hosts")
            return self._host_supply.hosts_of(machines)
        except HostProviderError as exc:
            raise KernelRequestError(f"kernelspec {name!r} names remote_hosts: {exc}") from None

    # -- restart, shutdown, interrupt ---------------------------------------------------------

    async def restart_kernel(self, kernel_id: str) -> GatewayKernel:
        kernel = self.get(kernel_id)
        async with kernel.lifecycle_lock:
            kernel.begin_restart()
            self.scheduling.handle(KernelStopped(kernel_id))
            await self.replicas.stop_all(kernel)
            # The new replicas start empty: what the old ones stored is of no use now (and
            # is deleted before they can store anything under the same keys).
            await self._delete_objects(kernel_id, 0.0)
            kernel.forget_replicas()
            try:
                await self.membership.launch_group(kernel)
            except KernelStartError as exc:
                kernel.mark_dead(f"restart failed: {exc}")
                self.state_store.save(kernel.record)
                raise
            finally:
                kernel.end_restart()
            self.state_store.save(kernel.record)
        log.info("kernel %s restarted", kernel_id)
        return kernel

    async def shutdown_kernel(self, kernel_id: str) -> None:
        kernel = self.get(kernel_id)
        async with kernel.lifecycle_lock:
            self.kernels.pop(kernel_id, None)
            kernel.fail_pending("KernelShutdown", "the kernel was shut down")
            self.scheduling.handle(KernelStopped(kernel_id))
            await self.replicas.stop_all(kernel)
            self.state_store.delete(kernel_id)
            for client in tuple(kernel.clients):
                client.close(1000, "kernel shut down")
            kernel.close()
        self._spawn(self._delete_objects(kernel_id, self.config.store_retention, tombstone=True))
        log.info("kernel %s shut down", kernel_id)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        kernel = self.get(kernel_id)
        if kernel.is_dead:
            raise KernelUnavailable(f"kernel {kernel_id} is dead: {kernel.record.dead_reason}")
        for term in kernel.waiting_terms():
            # Cells waiting for GPUs have not reached a replica: they leave the queue here.
            kernel.cancel_waiting(term, "KeyboardInterrupt", "interrupted while waiting for GPUs")
            self.scheduling.execution_cancelled(kernel, term)
        if not await kernel.cells_begun():
            log.info("kernel %s: interrupting a cell its replica has not begun yet", kernel_id)
        spec = self.specs.get(kernel.record.name)
        if spec is not None and spec.interrupt_mode == "message":
            link = kernel.executor_link()
            if link is not None:
                await kernel.request(link, "control", "interrupt_request", {}, 5.0)
            return
        errors = []
        targets = kernel.live_replicas()
        if len(targets) > 1 and kernel.executor is not None:
            # Standby replicas are only waiting on the log; interrupting them would break that.
            targets = [r for r in targets if r.replica_id == kernel.executor] or targets
        for replica in targets:
            try:
                await self.replicas.signal(replica, signal.SIGINT)
            except LaunchError as exc:
                errors.append(f"replica {replica.replica_id}: {exc}")
        if errors and len(errors) == len(targets):
            raise KernelUnavailable("could not interrupt: " + "; ".join(errors))

    # -- the object store ---------------------------------------------------------------------

    def _store_failed(self, message: str) -> None:
        self.notifier.notify("store_unreachable", "warning", "cluster", message, logger=log)

    def object_store(self) -> ObjectStore:
        """The store the replicas use (opened on first use)."""
        if self._object_store is None:
            self._object_store = open_store(self.config.store_url or self.config.store_dir.as_uri())
        return self._object_store

    async def _delete_objects(self, kernel_id: str, delay: float, tombstone: bool = False) -> None:
        """Delete what a kernel's replicas put in the object store (its large values), after
        ``delay`` seconds (the retention). With ``tombstone`` (the kernel is gone for good),
        first mark it deleted in the store (``store.tombstone_key``; removed last): a gateway
        stopped before then leaves them to ``nbcluster store gc``, which deletes only the
        objects of kernels marked so."""
        if tombstone:
            try:
                await asyncio.to_thread(
                    self.object_store().put, tombstone_key(kernel_id), str(time.time()).encode()
                )
            except (StoreError, ValueError) as exc:
                self._store_failed(f"could not mark kernel {kernel_id} deleted in the store: {exc}")
        if delay > 0:
            await asyncio.sleep(delay)
        prefix = f"kernels/{kernel_id}/"

        def delete_all() -> int:
            store = self.object_store()
            keys = [info.key for info in store.list(prefix)]
            for key in keys:
                store.delete(key)
            if tombstone:
                store.delete(tombstone_key(kernel_id))
            return len(keys)

        try:
            count = await asyncio.to_thread(delete_all)
        except (StoreError, ValueError) as exc:
            self._store_failed(f"could not delete the stored objects of kernel {kernel_id}: {exc}")
            return
        if count:
            log.info("deleted %d stored object(s) of kernel %s", count, kernel_id)

    # -- recovery (``_recovery``, ``_reclaim``) -----------------------------------------------

    async def move_replica(self, migrate: Migrate) -> bool:
        """The scheduler driver's ``ReplicaMover``: carried out by the recovery."""
        return await self.recovery.move_replica(migrate)

    async def migrate_replica(
        self, kernel_id: str, replica_id: str, to_host: str | None
    ) -> dict[str, Any]:
        """``POST /api/cluster/kernels/{id}/replicas/{rid}/migrate``: move one replica now."""
        return await self.recovery.migrate(self.get(kernel_id), replica_id, to_host)

    async def checkpoint_kernel(self, kernel_id: str) -> dict[str, Any]:
        """``POST /api/cluster/kernels/{id}/checkpoint``: a replica writes the kernel's state
        to the store now (on its control channel, so a running cell does not delay it)."""
        return await self.recovery.checkpoint(self.get(kernel_id))

    async def reclaim_idle(self) -> None:
        """Run by the gateway when ``reclaim_idle_after`` is set (``_reclaim``)."""
        await self.reclaimer.run()

    # -- host events and gateway restart (``_reconcile``) -------------------------------------

    def on_replica_exited(self, host: str, event: ReplicaExited) -> None:
        """The host endpoint: a host daemon reported a replica's exit."""
        self.launcher.host_reported_exit(host, event)

    def _replica_exited(self, exit: ReplicaExit) -> None:
        """The launcher's exit listener."""
        self.reconciler.replica_exited(exit)

    def on_host_lost(self, entry: HostEntry) -> None:
        self.reconciler.host_lost(entry)

    async def on_host_disconnected(self, entry: HostEntry) -> None:
        await self.reconciler.host_disconnected(entry)

    def on_host_hello(self, entry: HostEntry, reports: list[ReplicaReport]) -> list[str]:
        """Returns replica ids the host runs that belong to no known kernel: the caller
        stops them."""
        return self.reconciler.host_hello(entry, reports)

    def restore(self) -> None:
        """Load persisted kernels at start-up and reconnect to their replicas' sockets."""
        self.reconciler.reattach()

    async def close(self) -> None:
        """Detach from every kernel (they keep running) when the gateway stops."""
        await self._background.close(timeout=5.0)
        await self.scheduling.close()
        for kernel in self.kernels.values():
            for client in tuple(kernel.clients):
                client.close(1001, "gateway shutting down")
            kernel.close()
        self.replicas.close()
