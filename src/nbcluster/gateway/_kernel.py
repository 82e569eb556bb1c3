"""One kernel as the gateway sees it: its replicas' links, its websocket clients, and the
routing of messages between them.

Client requests go to the kernel's executing replica; replies go back to the client that asked
(see :mod:`._routing`), IOPub goes to every client. When the kernel cannot serve (dead,
restarting, no replica), requests are answered at once with an error reply that says why,
instead of leaving the client waiting.

The kernel owns its state: its lifecycle (:data:`KernelState`) changes only through its own
methods (``started``, ``begin_restart`` ... ``mark_dead``), called by the kernel manager's
modules; its cells' terms and attempts are kept by :class:`._execution.Executions` (pure).

What is not the routing itself is apart: the pure parts (``_routing``, ``_execution``,
``_replies``, and the texts of refusals and losses in ``_kernel_texts``), the protocols of its
clients and its gate (``_kernel_protocols``, re-exported here), and the gateway's own requests
to a replica and the readiness check (``_kernel_requests``).

Over 500 lines, knowingly (about 670): what is left is one object's routing, a single state
machine over the same tables (open requests, open cells, held messages, awaited ``idle``
statuses) for client messages, replica messages, the loss of a replica and the kernel's
lifecycle. Nearly every method reads or changes several of those tables at once (a cell's
dispatch: the open cells, the open requests, the awaited ``idle`` and the executor); split
along any of them, each half would have to reach into the other's state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from ..protocol import (
    METADATA_KEY,
    YIELD_ENAME,
    ExecuteMetadata,
    Message,
    Signer,
    dumps,
    new_message,
    read_device_memory,
)
from ._errors import KernelUnavailable
from ._execution import Execution, Executions, requested_gpus
from ._kernel_protocols import ClientSink, ExecutionGate
from ._kernel_requests import Owner, Waiter, send_and_wait, wait_ready
from ._kernel_texts import every_replica_lost, lost_cell_replies, replica_lost, unavailable_reason
from ._repair import RepairStatus, is_degraded
from ._replica import ReplicaLink
from ._replies import error_replies, status_message
from ._routing import PendingRequests
from ._state import KernelRecord, ReplicaRecord

__all__ = [
    "ClientSink",
    "ExecutionGate",
    "GatewayKernel",
    "KernelState",
    "error_replies",
]

#: A kernel's state as clients see it (``execution_state`` of its REST model): ``starting``
#: until its replicas are up, then ``idle``/``busy`` as its executing replica says, except
#: while it is ``restarting`` (restarted, restored, woken after idle reclamation; client
#: messages are held) and once it is ``dead`` (no replica left; a restart revives it).
KernelState = Literal["starting", "idle", "busy", "restarting", "dead"]

log = logging.getLogger(__name__)


#: Messages held for a restarting kernel, at most (then refused with an error reply).
_HOLD_LIMIT = 1000


#: A cell: its request message and the client that sent it.
_Execution = Execution[Message, ClientSink]


class GatewayKernel:
    """Created by the kernel manager; websocket handlers attach clients and feed messages."""

    def __init__(
        self,
        record: KernelRecord,
        *,
        gate: ExecutionGate | None = None,
        on_routed: Callable[[str, str], None] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        on_wake: Callable[[GatewayKernel], None] | None = None,
        on_executor_changed: Callable[[GatewayKernel, str, str], None] | None = None,
    ) -> None:
        self.record = record
        #: Told when a cell runs on another replica than the last cell did (a notice).
        self._on_executor_changed = on_executor_changed
        self._last_dispatched: str | None = None
        self.signer = Signer(record.key.encode())
        self.links: dict[str, ReplicaLink] = {}
        self.clients: set[ClientSink] = set()
        self.pending: PendingRequests[Owner] = PendingRequests()
        self._state: KernelState = "starting"
        self.last_activity = datetime.now(UTC)
        self._executor: str | None = None
        #: Execute requests not yet answered, and the terms (pure bookkeeping).
        self._executions: Executions[Message, ClientSink] = Executions()
        #: Where cells run (GPU binding); None: at once, on the executor.
        self._gate = gate
        #: A message for the user, shown in the next cell's output (the kernel was restored).
        self._notice: str | None = None
        #: Called when a message arrives for a kernel whose replicas were reclaimed.
        self._on_wake = on_wake
        #: Shell requests whose closing ``idle`` has not arrived: msg id -> (header, replica).
        self.awaiting_idle: dict[str, tuple[bytes, str]] = {}
        #: Cells sent to a replica that has not begun them yet (no ``busy`` with them as
        #: parent): set once it has. A replica ignores SIGINT until it has begun a cell, so an
        #: interrupt waits for this (``cells_begun``).
        self._unbegun: dict[str, asyncio.Event] = {}
        #: Client messages that arrived while the kernel was restarting.
        self.held: list[tuple[ClientSink, Message]] = []
        #: Held by the kernel manager's modules while they start, stop or change replicas.
        self.lifecycle_lock = asyncio.Lock()
        self._repair: RepairStatus | None = None
        self._on_routed = on_routed or (lambda channel, direction: None)
        self._on_reject = on_reject or (lambda source, reason: None)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def execution_state(self) -> KernelState:
        return self._state

    @property
    def executor(self) -> str | None:
        """The replica that ran the last cell (and gets client requests)."""
        return self._executor

    @property
    def executions(self) -> Executions[Message, ClientSink]:
        """The cells not yet answered (to read; only this class changes them)."""
        return self._executions

    @property
    def execution_count(self) -> int:
        return self._executions.execution_count

    @property
    def next_term(self) -> int:
        """Execution index of the next cell; replicas elect an executor per term."""
        return self._executions.next_term

    @property
    def last_replied_term(self) -> int:
        return self._executions.last_replied_term

    @property
    def repair(self) -> RepairStatus | None:
        """Progress of the repair loop (``_recovery``) while the kernel lacks a replica."""
        return self._repair

    @property
    def is_dead(self) -> bool:
        return self._state == "dead"

    def replica(self, replica_id: str) -> ReplicaRecord | None:
        return next((r for r in self.record.replicas if r.replica_id == replica_id), None)

    def live_replicas(self) -> list[ReplicaRecord]:
        return [r for r in self.record.replicas if r.state in ("running", "unknown", "starting")]

    @property
    def serving_replicas(self) -> int:
        """Replicas that can run cells (a replacement still catching up cannot)."""
        return sum(1 for r in self.record.replicas if r.state in ("running", "unknown"))

    @property
    def degraded(self) -> bool:
        """Whether the kernel runs with fewer replicas than configured (see ``_repair``)."""
        return is_degraded(
            self._state,
            self.record.replica_count,
            self.serving_replicas,
            self.record.reclaimed,
        )

    # -- links --------------------------------------------------------------------------------

    def make_link(self, context: Any, replica: ReplicaRecord) -> ReplicaLink:
        assert replica.connection is not None
        link = ReplicaLink(
            context,
            replica.replica_id,
            replica.connection,
            self.signer,
            self.on_replica_message,
            self._reject_from_replica,
        )
        link.open()
        old = self.links.pop(replica.replica_id, None)
        if old is not None:
            old.close()
        self.links[replica.replica_id] = link
        return link

    def drop_link(self, replica_id: str) -> None:
        link = self.links.pop(replica_id, None)
        if link is not None:
            link.close()
        if self._executor == replica_id:
            self._executor = None

    def executor_link(self) -> ReplicaLink | None:
        """The replica that serves client requests: the last executor, else any live one."""
        if self._executor in self.links:
            return self.links[self._executor]
        for replica in self.record.replicas:
            if replica.state in ("running", "unknown") and replica.replica_id in self.links:
                self._executor = replica.replica_id
                return self.links[replica.replica_id]
        return None

    # -- client side --------------------------------------------------------------------------

    def attach(self, client: ClientSink) -> None:
        self.clients.add(client)
        if self.is_dead:
            client.send(self._status("dead"))

    def detach(self, client: ClientSink) -> None:
        self.clients.discard(client)
        self.pending.drop_owner(client)

    def handle_client_message(self, client: ClientSink, msg: Message) -> None:
        """Route one decoded client message to the executing replica."""
        self.last_activity = datetime.now(UTC)
        self._on_routed(msg.channel, "in")
        if self.record.reclaimed and self._on_wake is not None and not self.is_dead:
            # Its replicas were released while idle: hold this and bring them back.
            self.record.reclaimed = False
            self._state = "restarting"
            self._on_wake(self)
        if self._state == "restarting" and len(self.held) < _HOLD_LIMIT:
            # As ZMQ would queue them for a restarting local kernel: delivered once it is up.
            self.held.append((client, msg))
            return
        link = None if self._state in ("dead", "restarting") else self.executor_link()
        if link is None:
            self._refuse(client, msg, unavailable_reason(self._state, self.record.dead_reason))
            return
        if msg.msg_type == "execute_request":
            self._submit_execution(client, msg, link)
            return
        is_request = msg.msg_type.endswith("_request")
        if is_request:
            self.pending.add(
                msg.msg_id, msg.msg_type, msg.channel, msg.header, client, link.replica_id
            )
            if msg.channel == "shell":
                self._await_idle(msg, link.replica_id)
        try:
            link.send(msg)
        except ConnectionError as exc:
            if is_request:
                self.pending.route(msg.msg_id, msg.msg_type.replace("_request", "_reply"))
            self._refuse(client, msg, str(exc))

    def _submit_execution(self, client: ClientSink, msg: Message, executor: ReplicaLink) -> None:
        """Give the cell a term and ask the gate where it runs (now or once GPUs are free).

        On a replicated kernel the request goes to the chosen replica only, carrying the term
        (this kernel's execution index) that the replicas elect an executor for, and the last
        term whose reply we saw, whose state the executor must have applied before it runs
        this cell. The other replicas get nothing: the first committed ``lead`` decides the
        term (see ``docs/replication.md``), and they follow the log. Sending them
        ``yield_request``s, as NotebookOS does, cost 6 ms per cell on a 2-core machine for no
        decision it could change.
        """
        execution = self._executions.submit(msg.msg_id, msg, client)
        if self._notice is not None:
            self._broadcast_stream(msg.header, self._notice)
            self._notice = None
        # Registered now, so that a kernel that dies meanwhile answers a waiting cell too.
        self.pending.add(msg.msg_id, msg.msg_type, msg.channel, msg.header, client)
        if self._gate is None:
            self.dispatch(execution.term, executor.replica_id, None)
        else:
            self._gate.execution_requested(
                self,
                execution.term,
                executor.replica_id,
                requested_gpus(msg.content_dict.get("code")),
            )

    def dispatch(self, term: int, replica_id: str, devices: tuple[int, ...] | None) -> bool:
        """Run cell ``term`` on ``replica_id`` with GPU ``devices`` (None: say nothing of GPUs).

        Called by the gate. Returns False when the cell is no longer waiting (answered) or the
        replica is gone: the gate then releases what it bound."""
        execution = self._executions.waiting_at(term)
        link = self.links.get(replica_id)
        if execution is None or link is None:
            return False
        msg = execution.request
        fields = self._executions.metadata(execution, len(self.links) > 1, devices)
        if fields:
            # (Without either, a client's own metadata goes through as it came.)
            metadata = orjson.loads(msg.metadata)
            metadata[METADATA_KEY] = ExecuteMetadata(**fields).dump()
            msg.metadata = dumps(metadata)
        self._executions.dispatched(execution, replica_id, devices)
        self._executor = replica_id
        previous, self._last_dispatched = self._last_dispatched, replica_id
        if previous not in (None, replica_id) and self._on_executor_changed is not None:
            self._on_executor_changed(self, previous, replica_id)
        self.pending.add(
            msg.msg_id, msg.msg_type, msg.channel, msg.header, execution.owner, replica_id
        )
        self._await_idle(msg, replica_id)
        self._began(msg.msg_id)  # a cell sent again: whoever waited on the first send goes on
        self._unbegun[msg.msg_id] = asyncio.Event()
        if len(self._unbegun) > _HOLD_LIMIT * 10:
            self._unbegun.pop(next(iter(self._unbegun))).set()
        try:
            link.send(msg)
        except ConnectionError as exc:
            self._began(msg.msg_id)
            self.pending.route(msg.msg_id, "execute_reply")
            self.awaiting_idle.pop(msg.msg_id, None)
            self._executions.forget(execution)
            self._refuse(execution.owner, msg, str(exc))
            return False
        return True

    def waiting_terms(self) -> list[int]:
        """Terms of cells that wait for GPUs (not yet sent to a replica), oldest first."""
        return self._executions.waiting_terms()

    def show_waiting(self, term: int, text: str) -> None:
        """Tell the user, in the cell, that it waits for GPUs and why (once per cell)."""
        execution = self._executions.waiting_at(term)
        if execution is None:
            return
        header = execution.request.header
        if not execution.announced:
            execution.announced = True
            busy = status_message("busy", header)
            for client in tuple(self.clients):
                client.send(busy)
        self._broadcast_stream(header, text)

    def cell_started_after_wait(self, term: int, text: str) -> None:
        """Called by the gate when a cell that announced a wait got its GPUs: says so in the
        cell."""
        execution = self._executions.at(term)
        if execution is not None and execution.announced:
            self._broadcast_stream(execution.request.header, text)

    def _broadcast_stream(self, parent: bytes, text: str) -> None:
        stream = new_message("iopub", "stream", {"name": "stderr", "text": text}, parent=parent)
        for client in tuple(self.clients):
            client.send(stream)

    def cancel_waiting(self, term: int, ename: str, reason: str) -> None:
        """Answer a waiting cell with an error instead of running it (interrupted, aborted)."""
        execution = self._executions.waiting_at(term)
        if execution is None:
            return
        self.pending.route(execution.msg_id, "execute_reply")
        self._executions.forget(execution)
        if execution.owner in self.clients:
            for reply in error_replies(
                "shell", "execute_request", execution.request.header, ename, reason
            ):
                execution.owner.send(reply)

    def _began(self, msg_id: str) -> None:
        event = self._unbegun.pop(msg_id, None)
        if event is not None:
            event.set()

    async def cells_begun(self, timeout: float = 3.0) -> bool:
        """Called by the kernel manager before it interrupts: unless a cell is running
        (``busy``), wait until every cell sent to a replica has begun there, at most
        ``timeout`` seconds (normally milliseconds; bounded, so that an interrupt is never
        lost to a replica that is gone); False when one had not by then. A replica records SIGINT only
        once its handler has begun the cell (``kernel/_interrupts``); an interrupt sent right
        behind a cell would otherwise reach it first and be ignored, and the cell run on."""
        if self._state == "busy":
            return True  # a running cell is what the interrupt is for: at once
        events = list(self._unbegun.values())
        try:
            async with asyncio.timeout(timeout):
                for event in events:
                    await event.wait()
        except TimeoutError:
            return False
        return True

    def _await_idle(self, msg: Message, replica: str) -> None:
        self.awaiting_idle[msg.msg_id] = (msg.header, replica)
        if len(self.awaiting_idle) > _HOLD_LIMIT * 10:
            del self.awaiting_idle[next(iter(self.awaiting_idle))]

    def on_replica_lost(
        self, replica: str, reason: str, release: Callable[[], object] | None = None
    ) -> None:
        """A replica of a kernel that still has others is gone (the manager dropped its link).

        Execute requests it had not answered go to another replica under the same term with
        the next attempt: if the lost replica had won the term, the election says so and the
        client gets ``ReplicaLost`` (the cell may have run partly); otherwise the cell simply
        runs elsewhere. Its other open requests are answered with ``ReplicaLost``, and a
        request whose reply came but whose ``idle`` did not gets its ``idle``. ``release``
        (the manager's: tell the scheduler) runs once those cells are marked unsent, so that
        the gate can re-bind them ahead of any cell that waited behind them.
        """
        target = self.executor_link()
        rerun = [] if target is None else self._executions.rerun_from(replica, reason)
        for execution in rerun:
            log.info(
                "kernel %s: term %d runs again (attempt %d): %s",
                self.id,
                execution.term,
                execution.attempt,
                reason,
            )
            # Re-registered under no replica, so that fail_pending below leaves it alone.
            msg = execution.request
            self.pending.add(msg.msg_id, msg.msg_type, msg.channel, msg.header, execution.owner)
            self.awaiting_idle.pop(msg.msg_id, None)
        if release is not None:
            release()
        for execution in rerun:
            if not execution.waiting or not self._executions.is_open(execution):
                continue  # dispatched by release(), or answered meanwhile
            assert target is not None
            if self._gate is None:
                self.dispatch(execution.term, target.replica_id, execution.devices)
            else:
                code = execution.request.content_dict.get("code")
                self._gate.execution_requested(
                    self, execution.term, target.replica_id, requested_gpus(code)
                )
        self.fail_pending("ReplicaLost", replica_lost(reason), replica=replica)
        for msg_id, (header, owner_replica) in list(self.awaiting_idle.items()):
            if owner_replica == replica:
                del self.awaiting_idle[msg_id]
                idle = status_message("idle", header)
                for client in tuple(self.clients):
                    client.send(idle)
        if self._state == "busy":
            self._state = "idle"

    def _refuse(self, client: ClientSink, msg: Message, reason: str) -> None:
        if not msg.msg_type.endswith("_request"):
            log.info("dropping %s for kernel %s: %s", msg.msg_type, self.id, reason)
            return
        ename = "KernelDead" if self.is_dead else "KernelUnavailable"
        for reply in error_replies(msg.channel, msg.msg_type, msg.header, ename, reason):
            client.send(reply)
        if self.is_dead:
            client.send(self._status("dead"))

    # -- replica side -------------------------------------------------------------------------

    def on_replica_message(self, link: ReplicaLink, msg: Message) -> None:
        self.last_activity = datetime.now(UTC)
        self._on_routed(msg.channel, "out")
        if msg.channel == "iopub":
            if msg.msg_type == "iopub_welcome":
                return
            if len(self.links) > 1 and link.replica_id != self._executor:
                return  # standby replicas' status changes are not the kernel's
            if msg.msg_type == "status":
                state = msg.content_dict.get("execution_state")
                if state == "starting":
                    return  # the gateway announces lifecycle states itself
                if msg.parent_msg_id is not None:
                    self._began(msg.parent_msg_id)
                if state == "idle" and msg.parent_msg_id is not None:
                    self.awaiting_idle.pop(msg.parent_msg_id, None)
                if state in ("busy", "idle") and self._state not in ("dead", "restarting"):
                    self._state = "busy" if state == "busy" else "idle"
            elif msg.msg_type == "execute_input":
                self._executions.counted(msg.content_dict.get("execution_count"))
            for client in tuple(self.clients):
                client.send(msg)
            return
        pending = self.pending.route(msg.parent_msg_id, msg.msg_type)
        if pending is None:
            log.debug(
                "no owner for %s (parent %s) of kernel %s", msg.msg_type, msg.parent_msg_id, self.id
            )
            return
        owner = pending.owner
        if msg.msg_type == "execute_reply":
            self._began(pending.msg_id)
            execution = self._executions.get(pending.msg_id)
            if execution is not None:
                self._execution_replied(execution, msg, link.replica_id)
                return
        if isinstance(owner, Waiter):
            owner.answer(msg)
        elif owner in self.clients:
            owner.send(msg)

    def _execution_replied(self, execution: _Execution, reply: Message, replica_id: str) -> None:
        content = reply.content_dict
        # The next cell's executor waits for this term's state. A cell cut off with its
        # replica has none coming: waiting for it would hold the next cell for the catch-up
        # timeout and then warn for nothing (``replied`` does not count it).
        lost = self._executions.replied(execution, content.get("ename") == YIELD_ENAME)
        if lost:
            # The lost replica had won this term: the cell may have run partly there.
            self._answer_lost_execution(execution, reply)
        elif execution.owner in self.clients:
            execution.owner.send(reply)
        if self._gate is None:
            return
        memory = None if lost else read_device_memory(content)
        if memory is not None:
            # Before the GPUs are released: the next binding sees what stays on them.
            held = {int(device): size for device, size in memory.held.items()}
            self._gate.device_memory_reported(self, replica_id, held)
        if content.get("status") == "error" and orjson.loads(execution.request.content).get(
            "stop_on_error", True
        ):
            # ipykernel aborts the requests queued behind a failed cell; cells held here
            # for GPUs were queued behind it too. Before the GPUs are released: the next
            # waiting cell would get them and run.
            for term in self.waiting_terms():
                self.cancel_waiting(term, "ExecutionAborted", "a cell before this one failed")
                self._gate.execution_cancelled(self, term)
        self._gate.execution_finished(self, execution.term)

    def _answer_lost_execution(self, execution: _Execution, yielded: Message) -> None:
        if execution.owner not in self.clients:
            return
        # The reason of the loss that sent it elsewhere (not of an older dead replica's).
        reason = execution.lost_reason or "its replica was lost"
        header = execution.request.header
        for reply in lost_cell_replies(header, reason, yielded.content_dict):
            execution.owner.send(reply)

    def _reject_from_replica(self, link: ReplicaLink, channel: str, reason: str) -> None:
        log.warning("rejected a %s message from replica %s: %s", channel, link.replica_id, reason)
        self._on_reject("replica", reason)

    async def request(
        self,
        link: ReplicaLink,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        timeout: float,
    ) -> Message:
        """Send a request of the gateway's own and wait for its reply (``_kernel_requests``)."""
        msg = new_message(channel, msg_type, content)
        return await send_and_wait(self.pending, link, msg, timeout)

    async def wait_ready(self, link: ReplicaLink, timeout: float) -> dict[str, Any]:
        """Wait until the replica answers kernel_info and its IOPub reaches us.

        Called after a replica starts and when a restarted gateway re-attaches. Returns the
        kernel_info reply content; raises ``TimeoutError``.
        """
        return await wait_ready(self.request, link, timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    #
    # starting --started--> idle <--> busy (the executor's status)
    # idle/busy --begin_restart/begin_restore/wake--> restarting --end_restart/end_restore--> idle
    # any --mark_dead--> dead --begin_restart--> restarting
    # Re-attached after a gateway restart: reattached(last_term) takes starting to idle.

    def started(self) -> None:
        """Its replicas are up (a new kernel, or one whose replicas were released while idle,
        found by a restarted gateway): ``idle``, without a status message."""
        self._state = "idle"

    def reattached(self, last_term: int) -> None:
        """A restarted gateway found a replica that applied ``last_term``: the terms continue
        after it, and a kernel still ``starting`` is ``idle``."""
        self._executions.continue_after(last_term)
        if self._state == "starting":
            self._state = "idle"

    def begin_restart(self) -> None:
        """Called by the manager as a restart starts: answer what the old replicas owed and
        hold new client messages until :meth:`end_restart`. No status is broadcast: a
        ``restarting`` status means an automatic restart after a crash to JupyterLab."""
        self.fail_pending("KernelRestarted", "the kernel was restarted")
        self._state = "restarting"

    def forget_replicas(self) -> None:
        """The old replicas of a restart are stopped: the kernel starts afresh, with no
        replica, no executor, no cause of death, and terms from 1."""
        self.record.replicas = []
        self.record.dead_reason = ""
        self._executor = None
        self._executions.restart()

    def reclaim(self) -> None:
        """Its replicas are being released while it is idle (``_reclaim``): their links go
        first, so that their last status messages do not reach the clients, to whom it stays
        ``idle``; its next message wakes it (``on_wake``)."""
        self.record.reclaimed = True
        for replica in self.live_replicas():
            self.drop_link(replica.replica_id)
        self._executor = None
        self._state = "idle"

    def repair_started(self, status: RepairStatus) -> None:
        """A repair loop works on the kernel (``repair`` shows its progress)."""
        self._repair = status

    def repair_ended(self, status: RepairStatus) -> None:
        if self._repair is status:
            self._repair = None

    def begin_restore(self, reason: str) -> None:
        """Every replica was lost; the manager starts new ones from the store. Open requests
        are answered (their cells are lost), new ones are held until :meth:`end_restore`."""
        self.fail_pending("ReplicaLost", every_replica_lost(reason))
        self._state = "restarting"

    def end_restore(self, term: int, notice: str) -> None:
        """The restored replicas are up with the state of ``term``: later cells build on it.
        ``notice`` is shown in the next cell's output."""
        self._executions.restored(term)
        self._notice = notice
        self.end_restart()

    def end_restart(self) -> None:
        """The restart finished (successfully or not): deliver or refuse held messages."""
        if not self.is_dead:
            self.set_state("idle")
        held, self.held = self.held, []
        for client, msg in held:
            if client in self.clients:
                self.handle_client_message(client, msg)

    def set_state(self, state: KernelState) -> None:
        """Set a lifecycle state (restarting, dead ...) and tell every client."""
        self._state = state
        status = self._status(state)
        for client in tuple(self.clients):
            client.send(status)

    def fail_pending(self, ename: str, reason: str, replica: str | None = None) -> None:
        """Answer open requests with an error: the replica that owed the reply is gone.

        With ``replica``, only the requests that replica was to answer.
        """
        taken = (
            self.pending.take_all() if replica is None else self.pending.take_for_replica(replica)
        )
        # Forget every answered cell before telling the gate: a release could otherwise hand
        # the GPUs to a cell of this very batch and send it to a replica.
        finished = []
        for pending in taken:
            execution = self._executions.get(pending.msg_id)
            if execution is not None:
                self._executions.forget(execution)
                finished.append(execution.term)
        for pending in taken:
            owner = pending.owner
            if isinstance(owner, Waiter):
                owner.fail(KernelUnavailable(reason))
                continue
            if owner not in self.clients:
                continue
            for reply in error_replies(
                pending.channel, pending.msg_type, pending.header, ename, reason
            ):
                owner.send(reply)
        if self._gate is not None:
            for term in finished:
                self._gate.execution_finished(self, term)

    def mark_dead(self, reason: str) -> None:
        self.record.dead_reason = reason
        self.fail_pending("KernelDied", f"the kernel died: {reason}")
        self.set_state("dead")

    def _status(self, state: str) -> Message:
        return status_message(state)

    def model(self) -> dict[str, Any]:
        """The Jupyter REST model of this kernel."""
        return {
            "id": self.id,
            "name": self.record.name,
            "last_activity": self.last_activity.isoformat().replace("+00:00", "Z"),
            "execution_state": self._state,
            "connections": len(self.clients),
        }

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
