"""The gateway's kernel manager: starts, restarts, interrupts and shuts down kernels through
the host daemons, reacts to replica exits and lost hosts, and re-attaches to running kernels
after a gateway restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import signal
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import zmq

from .. import envvars
from ..hostproto import ReplicaExited, ReplicaReport, SignalReplica, StartReplica, StopReplica
from ..protocol import (
    CheckpointReply,
    CheckpointRequest,
    ControlErrorReply,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
    RestorePoint,
)
from ..scheduling import (
    DEFAULT_REQUEST,
    HostAdded,
    HostRemoved,
    KernelAdopted,
    KernelStopped,
    Migrate,
    ReplicaAdopted,
    ReplicaReady,
    ReplicaStopped,
    Resources,
    parse_request,
    policy_named,
)
from ..store import ObjectStore, StoreError, open_store
from ._config import GatewayConfig
from ._control import control_request, replica_last_term
from ._driver import HostSupply, Placement, Refusal, SchedulerDriver, host_spec
from ._hosts import HostEntry, HostRegistry, HostRequestError
from ._kernel import GatewayKernel, KernelUnavailable
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpecRegistry
from ._metrics import GatewayMetrics
from ._repair import RepairStatus, RetryPolicy, plan_membership
from ._replica import ReplicaLink
from ._state import KernelRecord, ReplicaRecord, StateStore

__all__ = [
    "CheckpointError",
    "KernelManager",
    "KernelRejected",
    "KernelRequestError",
    "KernelStartError",
    "MigrationError",
    "NoSuchKernel",
]

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Resource requests (Enterprise Gateway convention) and the kind of number each must be.
RESOURCE_ENV = {
    "KERNEL_GPUS": int,
    "KERNEL_CPUS": float,
    "KERNEL_MEMORY_MB": float,
    "KERNEL_VRAM_GB": float,
}


class NoSuchKernel(LookupError):
    """No kernel has that id (404)."""


class KernelRequestError(ValueError):
    """The request names an unknown kernelspec or carries bad values (400)."""


class KernelStartError(RuntimeError):
    """The kernel could not be started (no host, a replica failed ...); the text says why."""


class KernelRejected(KernelStartError):
    """The scheduler refused the kernel. ``permanent``: no host could ever take it (400);
    otherwise the cluster is full now (503)."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class MigrationError(RuntimeError):
    """A requested migration was refused or failed; the text says why."""


class CheckpointError(RuntimeError):
    """A requested checkpoint could not be written; the text says why."""


def validate_env(env: Mapping[str, Any]) -> dict[str, str]:
    """The part of a client's ``env`` that reaches the kernel: ``KERNEL_*`` variables.

    Raises :class:`KernelRequestError` naming the first bad variable.
    """
    accepted: dict[str, str] = {}
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
        if name.startswith("KERNEL_"):
            accepted[name] = value
    return accepted


class KernelManager:
    """Owned by the gateway app; the REST API, the channels websocket and the host endpoint
    call into it. All methods run on the gateway's event loop."""

    def __init__(
        self,
        config: GatewayConfig,
        hosts: HostRegistry,
        specs: KernelSpecRegistry,
        store: StateStore,
        metrics: GatewayMetrics,
        host_supply: HostSupply | None = None,
    ) -> None:
        self.config = config
        self.hosts = hosts
        self.specs = specs
        self.store = store
        self.metrics = metrics
        self.kernels: dict[str, GatewayKernel] = {}
        self.zmq_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._background: set[asyncio.Task[Any]] = set()
        #: Backoff and per-attempt bound of replacements; one repair loop per kernel.
        self.repair_policy = RetryPolicy()
        self._repairs: dict[str, asyncio.Task[None]] = {}
        #: Set (and replaced) when a host registers: repair loops waiting out a backoff wake.
        self._host_arrived = asyncio.Event()
        self._object_store: ObjectStore | None = None
        policy_named(config.policy)  # a bad name fails at start-up, not at the first kernel
        #: Where new hosts come from (the gateway, for its auto-scaler): asked for hosts when
        #: the scheduler finds no room, waited on, and told of every registration.
        self.host_supply = host_supply
        #: The one driver of the scheduler: every placement, binding and migration.
        self.scheduling = SchedulerDriver(
            self.kernels,
            metrics,
            max_subscription_ratio=config.max_subscription_ratio,
            replicas_per_kernel=config.replicas_per_kernel,
            mover=self,
            hosts=host_supply,
        )

    # -- lookup -------------------------------------------------------------------------------

    def get(self, kernel_id: str) -> GatewayKernel:
        try:
            return self.kernels[kernel_id]
        except KeyError:
            raise NoSuchKernel(f"no kernel with id {kernel_id}") from None

    def _new_kernel(self, record: KernelRecord) -> GatewayKernel:
        kernel = GatewayKernel(
            record,
            gate=self.scheduling,
            on_routed=self.metrics.routed,
            on_reject=self.metrics.reject,
        )
        kernel.on_wake = self._wake
        return kernel

    # -- idle reclamation ---------------------------------------------------------------------

    async def reclaim_idle(self) -> None:
        """Every few seconds (started by the gateway when ``reclaim_idle_after`` is set):
        replicated kernels idle for longer release their replicas and claims."""
        limit = self.config.reclaim_idle_after
        assert limit is not None
        while True:
            await asyncio.sleep(min(max(limit / 4, 0.2), 5.0))
            now = datetime.now(UTC)
            for kernel in list(self.kernels.values()):
                idle_for = (now - kernel.last_activity).total_seconds()
                if (
                    idle_for > limit
                    and kernel.record.replica_count > 1
                    and not kernel.record.reclaimed
                    and kernel.execution_state == "idle"
                    and not kernel.executions
                    and not kernel.pending
                    and self._serving(kernel)
                ):
                    await self._reclaim(kernel, idle_for)

    async def _reclaim(self, kernel: GatewayKernel, idle_for: float) -> None:
        try:
            await self.checkpoint_kernel(kernel.id)
        except (CheckpointError, KernelUnavailable, TimeoutError) as exc:
            log.warning("kernel %s stays placed: no checkpoint (%s)", kernel.id, exc)
            return
        async with kernel.lifecycle_lock:
            if kernel.executions or kernel.pending or kernel.execution_state != "idle":
                return  # it was used meanwhile
            kernel.record.reclaimed = True
            self.metrics.reclaims.inc()
            self.scheduling.handle(KernelStopped(kernel.id))
            # Links first: the replicas' last status messages must not reach the clients, to
            # whom the kernel stays idle.
            for replica in kernel.live_replicas():
                kernel.drop_link(replica.replica_id)
            await self._stop_replicas(kernel)
            kernel.executor = None
            kernel.execution_state = "idle"
            self.store.save(kernel.record)
        log.info(
            "kernel %s was idle for %.0f s: its replicas were released (state checkpointed)",
            kernel.id,
            idle_for,
        )

    def _wake(self, kernel: GatewayKernel) -> None:
        """A message arrived for a reclaimed kernel: restore it (the message is held)."""
        self._spawn(
            self._restore_kernel(
                kernel,
                "it was idle",
                headline="This kernel's replicas were released while it was idle; it was "
                "restored on new ones",
            )
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- start --------------------------------------------------------------------------------

    async def start_kernel(self, name: str | None, env: Mapping[str, Any]) -> GatewayKernel:
        name = name or DEFAULT_KERNEL_NAME
        if self.specs.get(name) is None:
            raise KernelRequestError(
                f"unknown kernelspec {name!r}; available: {', '.join(self.specs.names)}"
            )
        kernel_env = validate_env(env)
        try:
            request = parse_request(kernel_env, DEFAULT_REQUEST)
        except ValueError as exc:
            raise KernelRequestError(f"env.{exc}") from None
        policy = policy_named(self.config.policy)
        record = KernelRecord(
            id=str(uuid.uuid4()),
            name=name,
            key=secrets.token_hex(32),
            raft_password=secrets.token_hex(16),
            env=kernel_env,
            working_dir=kernel_env.get("KERNEL_WORKING_DIR"),
            policy=policy.name,
            request=request.fields(),
            replica_count=(
                self.config.replicas_per_kernel if policy.name == "notebookos" else policy.replicas
            ),
        )
        kernel = self._new_kernel(record)
        self.kernels[record.id] = kernel
        started = time.monotonic()
        try:
            async with kernel.lifecycle_lock:
                await self._launch_replicas(kernel)
        except BaseException:
            self.kernels.pop(record.id, None)
            kernel.close()
            raise
        kernel.execution_state = "idle"
        self.store.save(record)
        self.metrics.kernel_start.observe(time.monotonic() - started)
        log.info("kernel %s (%s) started on %s", record.id, name, [r.host for r in record.replicas])
        return kernel

    @staticmethod
    def _request(record: KernelRecord) -> Resources:
        fields = record.request
        return Resources(
            int(fields.get("gpus", 0)),
            int(fields.get("millicpus", 0)),
            int(fields.get("memory_mb", 0)),
            float(fields.get("vram_gb", 0.0)),
        )

    async def _place(self, kernel: GatewayKernel) -> Placement:
        """Ask the scheduler where the kernel's replicas go. A full cluster that the
        auto-scaler can grow is given one chance to (reactive scale-out)."""
        record = kernel.record
        request = self._request(record)
        placed = self.scheduling.place_kernel(
            record.id, request, record.replica_count, record.policy
        )
        scaling = isinstance(placed, Refusal) and placed.scaling
        if (
            scaling
            and self.host_supply is not None
            and await self.host_supply.wait_for_hosts(self.config.launch_timeout)
        ):
            placed = self.scheduling.place_kernel(
                record.id, request, record.replica_count, record.policy
            )
        if isinstance(placed, Refusal):
            connected = len(self.hosts.connected())
            raise KernelRejected(
                f"cannot place the kernel: {placed.reason} ({connected} host(s) connected)",
                permanent=not scaling,
            )
        return placed

    async def _launch_replicas(
        self, kernel: GatewayKernel, restore: bool = False
    ) -> list[RaftStartReply]:
        """Place, start and (for several replicas) form the kernel's group. With ``restore``
        the replicas rebuild the state from the object store; returns what each says it
        restored."""
        place = await self._place(kernel)
        devices = place.reserved_devices
        kernel.record.reserved_devices = list(devices) if devices is not None else None
        results = await asyncio.gather(
            *(
                self._launch_replica(kernel, host, replica_id, devices=devices)
                for replica_id, host in place.replicas
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        restored: list[RaftStartReply] = []
        if not errors and len(place.replicas) > 1:
            try:
                restored = await self._form_group(kernel, restore)
            except KernelStartError as exc:
                errors.append(exc)
        if errors:
            self.scheduling.handle(KernelStopped(kernel.id))
            await self._stop_replicas(kernel)
            raise KernelStartError("; ".join(str(e) for e in errors))
        return restored

    async def _form_group(self, kernel: GatewayKernel, restore: bool) -> list[RaftStartReply]:
        """Have the replicas start their Raft nodes as one group and wait for a leader (and,
        with ``restore``, rebuild the state from the store). Returns their replies."""
        replicas = [r for r in kernel.record.replicas if r.state == "running"]
        addresses = {}
        for r in replicas:
            assert r.connection is not None
            if r.connection.raft_port is None:
                raise KernelStartError(f"replica {r.replica_id} reported no Raft port")
            addresses[r.replica_id] = f"{r.connection.ip}:{r.connection.raft_port}"
        peers = list(addresses.values())

        async def join(replica: ReplicaRecord) -> RaftStartReply:
            link = kernel.links[replica.replica_id]
            request = RaftStartRequest(
                address=addresses[replica.replica_id],
                peers=peers,
                members=len(replicas),
                timeout=10.0,
                restore=restore,
            )
            body = await control_request(kernel, link, "shell", request, RaftStartReply, 15.0)
            if isinstance(body, ControlErrorReply):
                raise KernelStartError(
                    f"replica {replica.replica_id} could not join its group: {body.evalue}"
                )
            return body

        results = await asyncio.gather(*(join(r) for r in replicas), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise KernelStartError("; ".join(str(f) or type(f).__name__ for f in failures))
        return [r for r in results if isinstance(r, RaftStartReply)]

    async def _launch_replica(
        self,
        kernel: GatewayKernel,
        host: str,
        replica_id: str,
        joining: bool = False,
        devices: tuple[int, ...] | None = None,
    ) -> ReplicaRecord:
        """Start one replica on ``host`` and wait until it answers. A ``joining`` replica (a
        replacement) stays ``starting`` until it has joined its group and caught up.
        ``devices``: GPUs it holds for its whole life (``reservation``)."""
        spec = self.specs.get(kernel.record.name)
        assert spec is not None
        replica = ReplicaRecord(replica_id=replica_id, host=host)
        kernel.record.replicas.append(replica)
        # The job API for the kernel's %%job and %jobs magics (a wildcard address: loopback).
        gateway_ip = "127.0.0.1" if self.config.ip in ("0.0.0.0", "::", "") else self.config.ip
        gateway_ip = f"[{gateway_ip}]" if ":" in gateway_ip else gateway_ip
        env = {
            **spec.env,
            **kernel.record.env,
            envvars.RAFT_PASSWORD.name: kernel.record.raft_password,
            envvars.STORE_URL.name: self.config.store_url or self.config.store_dir.as_uri(),
            envvars.STORE_THRESHOLD.name: str(self.config.store_threshold),
            envvars.GATEWAY_URL.name: f"http://{gateway_ip}:{self.config.port}",
            envvars.GATEWAY_TOKEN.name: self.config.token,
        }
        if devices is not None:
            visible = ",".join(map(str, devices))
            env |= {envvars.CUDA_VISIBLE_DEVICES.name: visible, envvars.GPUS.name: visible}
        timeout = self.config.launch_timeout
        try:
            result = await self.hosts.session(host).request(
                lambda rid: StartReplica(
                    request_id=rid,
                    kernel_id=kernel.id,
                    replica_id=replica.replica_id,
                    argv=spec.argv,
                    env=env,
                    key=kernel.record.key,
                    working_dir=kernel.record.working_dir,
                    launch_timeout=timeout,
                ),
                timeout=timeout + 5,
            )
            report = ReplicaReport.model_validate(result)
        except HostRequestError as exc:
            replica.state = "dead"
            replica.reason = str(exc)
            raise KernelStartError(f"replica on host {host} failed to start: {exc}") from None
        replica.pid = report.pid
        replica.connection = report.connection
        replica.state = "starting" if joining else "running"
        link = kernel.make_link(self.zmq_context, replica)
        try:
            await kernel.wait_ready(link, timeout)
        except (TimeoutError, KernelUnavailable) as exc:
            raise KernelStartError(f"replica on host {host} did not become ready: {exc}") from None
        return replica

    @staticmethod
    def _raft_address(replica: ReplicaRecord) -> str:
        assert replica.connection is not None and replica.connection.raft_port is not None
        return f"{replica.connection.ip}:{replica.connection.raft_port}"

    async def _swap_in(
        self, kernel: GatewayKernel, host: str, replica_id: str, timeout: float
    ) -> tuple[ReplicaRecord | None, str]:
        """Start ``replica_id`` on ``host`` and make it a member of the kernel's Raft group in
        place of the members that no longer run; it catches up from the log or a snapshot.

        Within ``timeout`` seconds, or the attempt is abandoned. On failure the new replica is
        stopped (the membership is left as it is: the next attempt reads and reconciles it).
        Returns the new replica (None on failure) and why it failed."""
        known = {r.replica_id for r in kernel.record.replicas}
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                new = await self._join_new_replica(kernel, host, replica_id)
        except Exception as exc:
            # Whatever went wrong (KeyError: a replica it needed died and its link is gone),
            # the half-started replica must not stay behind.
            if deadline.expired():
                why = f"it did not join within {timeout:g} s"
            else:
                why = str(exc) or type(exc).__name__
            if not isinstance(exc, (KernelStartError, KernelUnavailable, TimeoutError)):
                log.exception("kernel %s: replica %s failed to join", kernel.id, replica_id)
            for attempt in kernel.record.replicas:
                if attempt.replica_id not in known:
                    # Stopped before any later membership change removes it (pysyncobj's
                    # procedure: stop a member, then remove it).
                    await self._stop_replica(kernel, attempt)
                    attempt.state, attempt.reason = "dead", f"did not join: {why}"
            return None, why
        new.state = "running"
        return new, ""

    async def _join_new_replica(
        self, kernel: GatewayKernel, host: str, replica_id: str
    ) -> ReplicaRecord:
        running = [r for r in kernel.record.replicas if r.state == "running"]
        if not running:
            raise KernelStartError("no running replica is left to add it to")
        # Replicas a restarted gateway has not confirmed yet stay members: they are presumed
        # alive until their host says otherwise.
        live = [r for r in kernel.record.replicas if r.state in ("running", "unknown")]
        new = await self._launch_replica(kernel, host, replica_id, joining=True)
        # A standby replica does the membership change: the executor may be busy.
        helper = next((r for r in running if r.replica_id != kernel.executor), running[0])
        helper_link = kernel.links[helper.replica_id]
        new_address = self._raft_address(new)
        keep = [self._raft_address(r) for r in live]
        # The membership as it is, not as the last attempt left it in our view: a change
        # that timed out may still have committed, one that seemed to succeed may not have.
        plan = plan_membership(await self._raft_members(kernel, helper_link), keep, new_address)
        if plan.missing:
            log.warning(
                "kernel %s: running replicas missing from the Raft membership: %s",
                kernel.id,
                ", ".join(plan.missing),
            )
        if not plan.empty:
            change = MembershipRequest(remove=list(plan.remove), add=list(plan.add), timeout=20.0)
            changed = await control_request(
                kernel, helper_link, "shell", change, MembershipReply, 30.0
            )
            if isinstance(changed, ControlErrorReply):
                raise KernelStartError(f"membership change failed: {changed.evalue}")
        peers = [*keep, new_address]
        start = RaftStartRequest(address=new_address, peers=peers, members=len(peers), timeout=20.0)
        body = await control_request(
            kernel, kernel.links[new.replica_id], "shell", start, RaftStartReply, 30.0
        )
        if isinstance(body, ControlErrorReply):
            raise KernelStartError(f"could not join: {body.evalue}")
        # A new member replays the log's earlier membership changes on top of the membership
        # it was started with, and pysyncobj undoes them when the leader re-sends a range the
        # member already has: its view of the group can end up wrong (live members dropped,
        # dead ones back; see docs/replication.md, "Failures"). Such a member is not kept.
        joined = set(body.log.members)
        if joined != set(peers):
            raise KernelStartError(
                f"it joined with a wrong view of the group: {sorted(joined)}, expected "
                f"{sorted(peers)}"
            )
        return new

    @staticmethod
    async def _raft_members(kernel: GatewayKernel, link: ReplicaLink) -> list[str]:
        """The Raft membership as a live member sees it (changes appended to its log count,
        committed or not: the next change builds on them)."""
        # An empty change: the member answers with its log's status.
        body = await control_request(
            kernel, link, "shell", MembershipRequest(timeout=5.0), MembershipReply, 15.0
        )
        if isinstance(body, ControlErrorReply):
            raise KernelStartError(
                f"replica {link.replica_id} did not report its group's membership: {body.evalue}"
            )
        return list(body.log.members)

    # -- repair: back to the configured number of replicas ------------------------------------

    def _ensure_repair(self, kernel: GatewayKernel) -> None:
        """Start the kernel's repair loop unless it runs already: one per kernel, so that
        attempts never overlap (each also holds the kernel's lifecycle lock)."""
        if kernel.record.replica_count <= 1:
            return
        task = self._repairs.get(kernel.id)
        if task is not None and not task.done():
            return
        task = asyncio.create_task(self._repair(kernel))
        self._repairs[kernel.id] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _wake_repairs(self) -> None:
        """A host registered: repair loops waiting out a backoff try again now."""
        self._host_arrived.set()
        self._host_arrived = asyncio.Event()

    def _needs_replica(self, kernel: GatewayKernel) -> bool:
        """Whether the kernel should get another replica now. Not once it is gone, dead,
        being restarted or restored (which start every replica anew), or reclaimed; nor
        while no replica is confirmed running (with none left it is restored from the store
        instead)."""
        return (
            self.kernels.get(kernel.id) is kernel
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
        failed attempts with backoff (``repair_policy``) on another host when there is one.
        Runs in the background; the kernel keeps serving meanwhile."""
        policy = self.repair_policy
        status = kernel.repair = RepairStatus()
        #: The scheduler's placement of the last failed attempt, kept until the next attempt
        #: is placed, so that the scheduler avoids that host if it can (``place_replica``).
        held: str | None = None
        try:
            while True:
                wake = self._host_arrived
                async with kernel.lifecycle_lock:
                    if not self._needs_replica(kernel):
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
                self.metrics.replacement_failures.inc()
                delay = policy.delay(status.failed_attempts)
                status.retry_at = datetime.now(UTC) + timedelta(seconds=delay)
                log.warning(
                    "kernel %s runs degraded on %d of %d replicas: replacement attempt %d "
                    "failed (%s); retrying in %.1f s",
                    kernel.id,
                    kernel.serving_replicas,
                    kernel.record.replica_count,
                    status.failed_attempts,
                    why,
                    delay,
                )
                if not self._serving(kernel) and not kernel.is_dead:
                    # The others died while it tried: restore the kernel from the store.
                    self._lost_everything(kernel, f"every replica was lost ({why})")
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
        finally:
            if held is not None:
                self.scheduling.handle(ReplicaStopped(kernel.id, held, rerun=False))
            if kernel.repair is status:
                kernel.repair = None
            if self._repairs.get(kernel.id) is asyncio.current_task():
                del self._repairs[kernel.id]

    async def _replace_once(
        self, kernel: GatewayKernel, held: str | None, timeout: float
    ) -> tuple[str | None, str | None]:
        """One replacement attempt (the caller holds the lifecycle lock). Returns why it
        failed (None: it succeeded) and the failed attempt's placement, still held."""
        placed = self.scheduling.place_replica(kernel.id, held)
        if isinstance(placed, Refusal):
            return "no host has room for another replica", None
        [(replica_id, host)] = placed.replicas
        started = time.monotonic()
        new, why = await self._swap_in(kernel, host, replica_id, timeout)
        self.store.save(kernel.record)
        if new is None:
            return f"replica {replica_id} on {host}: {why}", replica_id
        self.scheduling.handle(ReplicaReady(kernel.id, replica_id))
        self.metrics.replacements.observe(time.monotonic() - started)
        log.info(
            "kernel %s: replica %s on %s joined in %.2f s (%d of %d replicas running)",
            kernel.id,
            new.replica_id,
            host,
            time.monotonic() - started,
            kernel.serving_replicas,
            kernel.record.replica_count,
        )
        return None, None

    async def move_replica(self, migrate: Migrate) -> bool:
        """Carry out a scheduler ``Migrate``: the new replica joins, the old one retires.

        Called by the scheduler driver (``ReplicaMover``), for a cell that needs GPUs
        elsewhere or for :meth:`migrate_replica`. On failure the scheduler is told what runs
        where again."""
        kernel = self.kernels.get(migrate.kernel_id)
        if kernel is None:
            return False
        async with kernel.lifecycle_lock:
            old = kernel.replica(migrate.replica_id)
            if self.kernels.get(kernel.id) is not kernel or old is None or old.state != "running":
                self.scheduling.handle(
                    ReplicaStopped(kernel.id, migrate.new_replica_id, rerun=False)
                )
                return False
            started = time.monotonic()
            # The old replica retires first: pysyncobj's leader refuses to remove itself, and
            # the old one may be the leader. The group commits on 2 of 3 meanwhile.
            await self._stop_replica(kernel, old)
            old.reason = f"migrating to {migrate.to_host}"
            new, why = await self._swap_in(
                kernel, migrate.to_host, migrate.new_replica_id, self.repair_policy.attempt_timeout
            )
            if new is None:
                log.error(
                    "kernel %s: migration of replica %s to %s failed: %s",
                    kernel.id,
                    old.replica_id,
                    migrate.to_host,
                    why,
                )
                # Its cell is asked for again by the scheduler driver (bounded attempts).
                self.scheduling.handle(
                    ReplicaStopped(kernel.id, migrate.new_replica_id, rerun=False)
                )
                self._replica_lost(kernel, old, f"migration to {migrate.to_host} failed: {why}")
                self.store.save(kernel.record)
                return False
            old.reason = f"migrated to {migrate.to_host} as {new.replica_id}"
            self.store.save(kernel.record)
            log.info(
                "kernel %s: replica %s moved from %s to %s as %s in %.2f s",
                kernel.id,
                old.replica_id,
                migrate.from_host,
                migrate.to_host,
                new.replica_id,
                time.monotonic() - started,
            )
            return True

    async def migrate_replica(
        self, kernel_id: str, replica_id: str, to_host: str | None
    ) -> dict[str, Any]:
        """``POST /api/cluster/kernels/{id}/replicas/{rid}/migrate``: move one replica now."""
        kernel = self.get(kernel_id)
        if kernel.is_dead:
            raise MigrationError(f"kernel {kernel_id} is dead: {kernel.record.dead_reason}")
        # The driver carries it out (``move_replica``) and counts it in the metrics.
        result = await self.scheduling.migrate(kernel_id, replica_id, to_host)
        if isinstance(result, Refusal):
            raise MigrationError(result.reason)
        migrate, seconds = result.migrate, result.seconds
        if not result.ok:
            raise MigrationError(
                f"replica {replica_id} could not move to {migrate.to_host}; see the gateway log"
            )
        return {
            "kernel_id": kernel_id,
            "replica_id": replica_id,
            "new_replica_id": migrate.new_replica_id,
            "from_host": migrate.from_host,
            "to_host": migrate.to_host,
            "seconds": round(seconds, 3),
        }

    @staticmethod
    def _serving(kernel: GatewayKernel) -> bool:
        """Whether a replica that can run cells is left (a replacement still catching up
        cannot)."""
        return any(r.state in ("running", "unknown") for r in kernel.record.replicas)

    def _lost_everything(self, kernel: GatewayKernel, reason: str) -> None:
        if kernel.is_dead or kernel.execution_state == "restarting":
            return
        if kernel.record.replica_count > 1:
            # Its state is in the object store: new replicas rebuild it.
            log.warning("kernel %s lost every replica (%s); restoring it", kernel.id, reason)
            kernel.begin_restore(reason)
            self._spawn(self._restore_kernel(kernel, reason))
        else:
            log.warning("kernel %s is dead: %s", kernel.id, reason)
            kernel.mark_dead(reason)
            self.scheduling.handle(KernelStopped(kernel.id))

    async def _restore_kernel(
        self, kernel: GatewayKernel, reason: str, headline: str | None = None
    ) -> None:
        """Start new replicas that rebuild the kernel from the store's checkpoint and log
        tail; messages sent meanwhile are held. Dead, with the reason, if nothing is stored."""
        started = time.monotonic()
        async with kernel.lifecycle_lock:
            if self.kernels.get(kernel.id) is not kernel:
                return
            self.scheduling.handle(KernelStopped(kernel.id))
            for leftover in kernel.live_replicas():
                await self._stop_replica(kernel, leftover)
            try:
                replies = await self._launch_replicas(kernel, restore=True)
                restored = [r.restored for r in replies if r.restored is not None]
                if not restored or len(restored) < len(replies):
                    raise KernelStartError("the object store holds no checkpoint of it")
                point = min(restored, key=lambda r: r.term)
            except KernelStartError as exc:
                await self._stop_replicas(kernel)
                self.scheduling.handle(KernelStopped(kernel.id))
                kernel.mark_dead(f"{reason}; it could not be restored: {exc}")
                kernel.end_restart()
                self.store.save(kernel.record)
                log.error("kernel %s could not be restored: %s", kernel.id, exc)
                return
            kernel.end_restore(point.term, _restore_notice(reason, point, headline))
            self.store.save(kernel.record)
            self.metrics.restores.observe(time.monotonic() - started)
            log.info(
                "kernel %s restored to term %s in %.2f s",
                kernel.id,
                point.term,
                time.monotonic() - started,
            )

    async def checkpoint_kernel(self, kernel_id: str) -> dict[str, Any]:
        """``POST /api/cluster/kernels/{id}/checkpoint``: a replica writes the kernel's state
        to the store now (on its control channel, so a running cell does not delay it)."""
        kernel = self.get(kernel_id)
        running = [r for r in kernel.record.replicas if r.state == "running"]
        if kernel.is_dead or not running:
            raise CheckpointError(f"kernel {kernel_id} has no running replica to checkpoint")
        if kernel.record.replica_count < 2:
            raise CheckpointError(
                f"kernel {kernel_id} runs one replica: checkpoints need a replicated kernel"
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
            "kernel_id": kernel_id,
            "term": body.term,
            "execution_count": body.execution_count,
            "created": datetime.fromtimestamp(body.created, UTC).isoformat(),
            "size": body.size,
            "replica_id": replica.replica_id,
        }

    # -- stop, restart, interrupt -------------------------------------------------------------

    async def _stop_replicas(self, kernel: GatewayKernel) -> None:
        await asyncio.gather(
            *(self._stop_replica(kernel, r) for r in kernel.record.replicas),
            return_exceptions=True,
        )

    async def _stop_replica(self, kernel: GatewayKernel, replica: ReplicaRecord) -> None:
        was_live = replica.state in ("running", "unknown", "starting")
        replica.state = "stopped"  # its exit is expected from now on
        link = kernel.links.get(replica.replica_id)
        if was_live and link is not None:
            with contextlib.suppress(TimeoutError, KernelUnavailable, ConnectionError):
                await kernel.request(link, "control", "shutdown_request", {"restart": False}, 1.0)
        kernel.drop_link(replica.replica_id)
        if not was_live:
            return
        try:
            await self.hosts.session(replica.host).request(
                lambda rid: StopReplica(request_id=rid, replica_id=replica.replica_id, grace=2.0),
                timeout=10,
            )
        except HostRequestError as exc:
            # Usually: it already exited after the shutdown request, or its host is gone.
            log.debug("stop of replica %s: %s", replica.replica_id, exc)

    async def shutdown_kernel(self, kernel_id: str) -> None:
        kernel = self.get(kernel_id)
        async with kernel.lifecycle_lock:
            self.kernels.pop(kernel_id, None)
            kernel.fail_pending("KernelShutdown", "the kernel was shut down")
            self.scheduling.handle(KernelStopped(kernel_id))
            await self._stop_replicas(kernel)
            self.store.delete(kernel_id)
            for client in tuple(kernel.clients):
                client.close(1000, "kernel shut down")
            kernel.close()
        self._spawn(self._delete_objects(kernel_id, self.config.store_retention))
        log.info("kernel %s shut down", kernel_id)

    def object_store(self) -> ObjectStore:
        """The store the replicas use (opened on first use)."""
        if self._object_store is None:
            self._object_store = open_store(self.config.store_url or self.config.store_dir.as_uri())
        return self._object_store

    async def _delete_objects(self, kernel_id: str, delay: float) -> None:
        """Delete what a kernel's replicas put in the object store (its large values), after
        ``delay`` seconds (the retention). A gateway stopped before then leaves them to
        ``nbcluster store gc``."""
        if delay > 0:
            await asyncio.sleep(delay)
        prefix = f"kernels/{kernel_id}/"

        def delete_all() -> int:
            store = self.object_store()
            keys = [info.key for info in store.list(prefix)]
            for key in keys:
                store.delete(key)
            return len(keys)

        try:
            count = await asyncio.to_thread(delete_all)
        except (StoreError, ValueError) as exc:
            log.warning("could not delete the stored objects of kernel %s: %s", kernel_id, exc)
            return
        if count:
            log.info("deleted %d stored object(s) of kernel %s", count, kernel_id)

    async def restart_kernel(self, kernel_id: str) -> GatewayKernel:
        kernel = self.get(kernel_id)
        async with kernel.lifecycle_lock:
            kernel.begin_restart()
            self.scheduling.handle(KernelStopped(kernel_id))
            await self._stop_replicas(kernel)
            # The new replicas start empty: what the old ones stored is of no use now (and
            # is deleted before they can store anything under the same keys).
            await self._delete_objects(kernel_id, 0.0)
            kernel.record.replicas = []
            kernel.record.dead_reason = ""
            kernel.executor = None
            kernel.next_term, kernel.last_replied_term = 1, 0
            try:
                await self._launch_replicas(kernel)
            except KernelStartError as exc:
                kernel.mark_dead(f"restart failed: {exc}")
                self.store.save(kernel.record)
                raise
            finally:
                kernel.end_restart()
            self.store.save(kernel.record)
        log.info("kernel %s restarted", kernel_id)
        return kernel

    async def interrupt_kernel(self, kernel_id: str) -> None:
        kernel = self.get(kernel_id)
        if kernel.is_dead:
            raise KernelUnavailable(f"kernel {kernel_id} is dead: {kernel.record.dead_reason}")
        for term in kernel.waiting_terms():
            # Cells waiting for GPUs have not reached a replica: they leave the queue here.
            kernel.cancel_waiting(term, "KeyboardInterrupt", "interrupted while waiting for GPUs")
            self.scheduling.execution_cancelled(kernel, term)
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
            replica_id = replica.replica_id

            def build(rid: str, replica_id: str = replica_id) -> SignalReplica:
                return SignalReplica(request_id=rid, replica_id=replica_id, signum=signal.SIGINT)

            try:
                await self.hosts.session(replica.host).request(build, timeout=5)
            except HostRequestError as exc:
                errors.append(f"replica {replica.replica_id}: {exc}")
        if errors and len(errors) == len(targets):
            raise KernelUnavailable("could not interrupt: " + "; ".join(errors))

    # -- host events --------------------------------------------------------------------------

    def _replica_lost(self, kernel: GatewayKernel, replica: ReplicaRecord, reason: str) -> None:
        replica.state = "dead"
        replica.reason = reason
        kernel.drop_link(replica.replica_id)
        stopped = ReplicaStopped(kernel.id, replica.replica_id)
        if self._serving(kernel):
            # The scheduler frees the replica's GPUs once the kernel has marked its cell to
            # run again, so that the cell is re-bound first.
            kernel.on_replica_lost(
                replica.replica_id, reason, release=lambda: self.scheduling.handle(stopped)
            )
            self._ensure_repair(kernel)
        else:
            self.scheduling.handle(stopped)
            self._lost_everything(kernel, reason)
        self.store.save(kernel.record)

    def on_replica_exited(self, host: str, event: ReplicaExited) -> None:
        kernel = self.kernels.get(event.kernel_id)
        replica = kernel.replica(event.replica_id) if kernel else None
        if kernel is None or replica is None or replica.state in ("stopped", "dead"):
            return
        reason = f"replica {replica.replica_id} on host {host} exited with code {event.exit_code}"
        if event.log_tail:
            log.warning("%s; end of its log:\n%s", reason, event.log_tail)
        self._replica_lost(kernel, replica, reason)

    def on_host_lost(self, entry: HostEntry) -> None:
        self.metrics.hosts_lost.inc()
        log.warning("host %s is lost (silent for over %.0f s)", entry.name, self.hosts.lost_timeout)
        for kernel in list(self.kernels.values()):
            for replica in kernel.live_replicas():
                if replica.host == entry.name:
                    self._replica_lost(kernel, replica, f"host {entry.name} was lost")
        self.scheduling.handle(HostRemoved(entry.name))

    async def on_host_disconnected(self, entry: HostEntry) -> None:
        """A host's websocket closed. Ping its replicas' heartbeat sockets until they stop
        answering (its daemon died, taking them with it: they are declared dead at once rather
        than after the lost timeout), the host comes back, or it is declared lost. One ping is
        not enough: a dying replica can still answer for a moment after its host's socket
        closed."""
        # Nothing new goes to it meanwhile; a hello brings it and its replicas back.
        self.scheduling.handle(HostRemoved(entry.name))
        deadline = time.monotonic() + self.hosts.lost_timeout
        while time.monotonic() < deadline:
            suspects = [
                (kernel, replica, link)
                for kernel in self.kernels.values()
                for replica in kernel.live_replicas()
                if replica.host == entry.name
                and (link := kernel.links.get(replica.replica_id)) is not None
            ]
            if not suspects:
                return
            answers = await asyncio.gather(*(link.ping(timeout=0.5) for _, _, link in suspects))
            current = self.hosts.hosts.get(entry.name)
            if current is None or current.state != "disconnected":
                return  # it came back, or it was declared lost (and handled) meanwhile
            for (kernel, replica, _), alive in zip(suspects, answers, strict=True):
                if not alive and replica.state in ("running", "unknown", "starting"):
                    self._replica_lost(
                        kernel,
                        replica,
                        f"host {entry.name} disconnected and its replica stopped answering",
                    )
            await asyncio.sleep(0.2)

    def on_host_hello(self, entry: HostEntry, reports: list[ReplicaReport]) -> list[str]:
        """Reconcile what a (re)connecting host runs with what we know.

        Returns replica ids the host runs that belong to no known kernel: the caller stops them.
        """
        if self.host_supply is not None:
            self.host_supply.host_registered(entry.name)
        spec, devices = host_spec(entry.resources)
        try:
            self.scheduling.handle(HostAdded(entry.name, spec, devices))
        except ValueError as exc:
            log.error("host %s reported unusable resources: %s", entry.name, exc)
        reported = {r.replica_id: r for r in reports}
        for kernel in list(self.kernels.values()):
            for replica in kernel.live_replicas():
                if replica.host != entry.name:
                    continue
                report = reported.pop(replica.replica_id, None)
                if report is None:
                    if replica.state != "starting":
                        self._replica_lost(
                            kernel, replica, f"host {entry.name} came back without this replica"
                        )
                    continue
                if replica.state == "unknown":
                    replica.state = "running"
                    replica.pid = report.pid
                    replica.connection = report.connection
                    if replica.replica_id not in kernel.links:
                        kernel.make_link(self.zmq_context, replica)
                    self.store.save(kernel.record)
                if replica.state == "running":
                    reserved = kernel.record.reserved_devices
                    self.scheduling.handle(
                        ReplicaAdopted(
                            kernel.id,
                            replica.replica_id,
                            entry.name,
                            self._request(kernel.record),
                            kernel.record.policy,
                            tuple(reserved) if reserved is not None else None,
                        )
                    )
        # A new host may take the replica that a kernel lacks (also a kernel that a restarted
        # gateway found short of replicas).
        for kernel in list(self.kernels.values()):
            if self._needs_replica(kernel):
                self._ensure_repair(kernel)
        self._wake_repairs()
        return list(reported)

    # -- gateway restart ----------------------------------------------------------------------

    def restore(self) -> None:
        """Load persisted kernels at start-up and reconnect to their replicas' sockets."""
        for record in self.store.load_all():
            kernel = self._new_kernel(record)
            self.kernels[record.id] = kernel
            if record.dead_reason:
                kernel.execution_state = "dead"
                continue
            if record.reclaimed:
                kernel.execution_state = "idle"  # restored by its next message
                continue
            # Its cells wait until a host's hello brings back one of its replicas.
            self.scheduling.handle(KernelAdopted(record.id, self._request(record), record.policy))
            for replica in record.replicas:
                if replica.state in ("running", "starting", "unknown") and replica.connection:
                    replica.state = "unknown"
                    kernel.make_link(self.zmq_context, replica)
            if not kernel.links:
                kernel.mark_dead("no replica survived the gateway restart")
                continue
            self._spawn(self._confirm_restored(kernel))
        if self.kernels:
            log.info("restored %d kernel(s) from %s", len(self.kernels), self.config.state_dir)
            self._spawn(self._expire_unknown_replicas(self.config.host_lost_timeout * 2))

    async def _confirm_restored(self, kernel: GatewayKernel) -> None:
        link = kernel.executor_link()
        if link is None:
            return
        try:
            info = await kernel.wait_ready(link, self.config.host_lost_timeout * 2)
        except (TimeoutError, KernelUnavailable):
            return
        last_term = replica_last_term(kernel, info)
        kernel.last_replied_term = max(kernel.last_replied_term, last_term)
        kernel.next_term = max(kernel.next_term, last_term + 1)
        if kernel.execution_state == "starting":
            kernel.execution_state = "idle"

    async def _expire_unknown_replicas(self, delay: float) -> None:
        await asyncio.sleep(delay)
        for kernel in list(self.kernels.values()):
            for replica in kernel.live_replicas():
                if replica.state == "unknown" and self.hosts.hosts.get(replica.host) is None:
                    self._replica_lost(
                        kernel,
                        replica,
                        f"host {replica.host} did not reconnect after the gateway restarted",
                    )

    async def close(self) -> None:
        """Detach from every kernel (they keep running) when the gateway stops."""
        for task in list(self._background):
            task.cancel()
        await self.scheduling.close()
        for kernel in self.kernels.values():
            for client in tuple(kernel.clients):
                client.close(1001, "gateway shutting down")
            kernel.close()
        self.zmq_context.destroy(linger=0)


def _restore_notice(reason: str, point: RestorePoint, headline: str | None = None) -> str:
    created = point.checkpoint_created
    when = (
        f"its checkpoint of {datetime.fromtimestamp(created, UTC):%Y-%m-%d %H:%M:%S} UTC"
        if created
        else "the store's log"
    )
    later = point.later_cells
    tail = f" and {later} later cell(s)" if later else ""
    count = point.execution_count
    if headline is not None:
        return f"[nbcluster] {headline} from {when}{tail}, up to cell [{count}].\n"
    return (
        f"[nbcluster] This kernel lost all its replicas ({reason}) and was restored from "
        f"{when}{tail}, up to cell [{count}]. Variables set by cells after that are lost.\n"
    )
