"""A kernel's replica group: where its replicas go, bringing them up as one Raft group, and
changing the group's membership when a replica is replaced or moved.

* :meth:`Membership.launch_group` asks the scheduler's driver for a placement (with one chance
  for the auto-scaler to add hosts), starts every replica (``_replicas``) and, for a
  replicated kernel, has them start their Raft nodes together (``nbcluster_raft_start``;
  with ``restore`` they rebuild the state from the object store).
* :meth:`Membership.swap_in` starts one new replica and makes it a member in place of the
  members that no longer run (``nbcluster_membership``, planned by ``_repair.plan_membership``
  from the membership as a live member reports it), then has it join.

It decides neither when a replica is replaced (``_recovery``) nor what runs where (the
scheduler).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..protocol import (
    ControlErrorReply,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
)
from ..scheduling import KernelStopped, Resources
from ._config import GatewayConfig
from ._control import control_request
from ._driver import HostSupply, Placement, Refusal, SchedulerDriver
from ._errors import KernelRejected, KernelStartError, KernelUnavailable
from ._hosts import HostRegistry
from ._kernel import GatewayKernel
from ._repair import plan_membership
from ._replica import ReplicaLink
from ._replicas import Replicas
from ._state import KernelRecord, ReplicaRecord

__all__ = ["Membership", "resource_request"]

log = logging.getLogger(__name__)


def resource_request(record: KernelRecord) -> Resources:
    """The resources a kernel asked for (``KERNEL_GPUS`` ...), as the scheduler takes them."""
    fields = record.request
    return Resources(
        int(fields.get("gpus", 0)),
        int(fields.get("millicpus", 0)),
        int(fields.get("memory_mb", 0)),
        float(fields.get("vram_gb", 0.0)),
    )


def raft_address(replica: ReplicaRecord) -> str:
    assert replica.connection is not None and replica.connection.raft_port is not None
    return f"{replica.connection.ip}:{replica.connection.raft_port}"


class Membership:
    """Owned by the kernel manager; used by its start and restart, and by ``_recovery``."""

    def __init__(
        self,
        config: GatewayConfig,
        hosts: HostRegistry,
        replicas: Replicas,
        scheduling: SchedulerDriver,
        host_supply: HostSupply | None,
    ) -> None:
        self._config = config
        self._hosts = hosts
        self._replicas = replicas
        self._scheduling = scheduling
        self._host_supply = host_supply

    # -- a whole group ------------------------------------------------------------------------

    async def _place(self, kernel: GatewayKernel) -> Placement:
        """Ask the scheduler where the kernel's replicas go. A full cluster that the
        auto-scaler can grow is given one chance to (reactive scale-out)."""
        record = kernel.record
        request = resource_request(record)

        def place() -> Placement | Refusal:
            return self._scheduling.place_kernel(
                record.id,
                request,
                record.replica_count,
                record.policy,
                record.owner,
                record.pool,
                record.confined_hosts,
            )

        placed = place()
        # Each try may find some of the hosts it asked for registered and not yet the rest
        # (three daemons started together register one by one): try again as they come.
        deadline = time.monotonic() + (record.launch_timeout or self._config.launch_timeout)
        while (
            isinstance(placed, Refusal)
            and placed.scaling
            and self._host_supply is not None
            and (remaining := deadline - time.monotonic()) > 0
            and await self._host_supply.wait_for_hosts(remaining)
        ):
            placed = place()
        if isinstance(placed, Refusal):
            connected = len(self._hosts.connected())
            raise KernelRejected(
                f"cannot place the kernel: {placed.reason} ({connected} host(s) connected)",
                # 503 when the hosts are only full now; 400 when none could ever take it.
                permanent=not (placed.scaling or placed.full),
            )
        return placed

    async def launch_group(
        self, kernel: GatewayKernel, restore: bool = False
    ) -> list[RaftStartReply]:
        """Place, start and (for several replicas) form the kernel's group. With ``restore``
        the replicas rebuild the state from the object store; returns what each says it
        restored. On failure every replica is stopped and ``KernelStartError`` says why."""
        place = await self._place(kernel)
        devices = place.reserved_devices
        kernel.record.reserved_devices = list(devices) if devices is not None else None
        results = await asyncio.gather(
            *(
                self._replicas.launch(kernel, host, replica_id, devices=devices)
                for replica_id, host in place.replicas
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        restored: list[RaftStartReply] = []
        if not errors and len(place.replicas) > 1:
            try:
                restored = await self.form_group(kernel, restore)
            except KernelStartError as exc:
                errors.append(exc)
        if errors:
            self._scheduling.handle(KernelStopped(kernel.id))
            await self._replicas.stop_all(kernel)
            raise KernelStartError("; ".join(str(e) for e in errors))
        return restored

    async def form_group(self, kernel: GatewayKernel, restore: bool) -> list[RaftStartReply]:
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

    # -- one new member -----------------------------------------------------------------------

    async def swap_in(
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
                    await self._replicas.stop(kernel, attempt)
                    attempt.state, attempt.reason = "dead", f"did not join: {why}"
            return None, why
        new.state = "running"
        return new, ""

    async def _join_new_replica(
        self, kernel: GatewayKernel, host: str, replica_id: str
    ) -> ReplicaRecord:
        if not self._linked_running(kernel):
            raise KernelStartError("no running replica is left to add it to")
        new = await self._replicas.launch(kernel, host, replica_id, joining=True)
        # Read after the launch: another replica may have died while it started (its record
        # says dead and its link is gone by now).
        running = self._linked_running(kernel)
        if not running:
            raise KernelStartError("every running replica was lost while it started")
        # Replicas a restarted gateway has not confirmed yet stay members: they are presumed
        # alive until their host says otherwise.
        live = [
            r
            for r in kernel.record.replicas
            if r.state in ("running", "unknown") and r.replica_id != new.replica_id
        ]
        # A standby replica does the membership change: the executor may be busy.
        helper = next((r for r in running if r.replica_id != kernel.executor), running[0])
        helper_link = kernel.links[helper.replica_id]
        new_address = raft_address(new)
        keep = [raft_address(r) for r in live]
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
    def _linked_running(kernel: GatewayKernel) -> list[ReplicaRecord]:
        """The replicas confirmed running that the gateway can still reach."""
        return [
            r
            for r in kernel.record.replicas
            if r.state == "running" and r.replica_id in kernel.links
        ]

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
