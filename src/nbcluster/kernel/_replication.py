"""The bridge between a replica's Raft log and its kernel.

:class:`ReplicaCoordinator` is the :class:`~nbcluster.consensus.LogStateMachine` of one replica:
the log's thread hands it committed records; it decodes them, runs the pure
:class:`~._election.ElectionLog`, keeps the merged state of every synchronised variable (so
that a snapshot can bring a new replica up to date), and passes the resulting events to the
kernel's event loop, where waiting handlers wake up and followers apply state updates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from ._election import Completed, Decided, ElectionLog, Event, Failed, Ignored
from ._payload import MergedState, decode_payload
from ._records import Done, Proposal, RecordError, decode_record

__all__ = ["ReplicaCoordinator"]

log = logging.getLogger(__name__)

#: Decisions kept below the last completed term (``decisions``).
_KEEP_DECISIONS = 64


class ReplicaCoordinator:
    """Owned by the replica kernel. ``apply``/``snapshot``/``restore`` run on the log's thread;
    everything else runs on the kernel's event loop."""

    def __init__(
        self,
        replica_id: str,
        members: int,
        loop: asyncio.AbstractEventLoop,
        on_state: Callable[[dict[str, Any] | None, int], None],
    ) -> None:
        self.replica_id = replica_id
        self._loop = loop
        self._on_state = on_state
        self._lock = threading.Lock()
        self.election = ElectionLog(members)
        #: the merged effect of every completed cell (what a snapshot restores)
        self.state = MergedState()
        self.applied_index = 0
        self.rejected = 0
        #: (term, attempt, replica) -> the names a lead said its cell binds (recent terms)
        self._binds: dict[tuple[int, int, str], tuple[str, ...]] = {}
        # loop-side view, updated from events in log order
        self.decisions: dict[tuple[int, int], str | None] = {}
        self.done_term = 0
        self.done_count = 0
        #: How many times state from another replica (or a snapshot) reached the namespace:
        #: the kernel checks whether it changed during a wait
        self.states_loaded = 0
        self._changed = asyncio.Event()

    # -- log thread -----------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> None:
        with self._lock:
            self.applied_index = index
            try:
                record = decode_record(data)
            except RecordError as exc:
                self.rejected += 1
                log.error("rejected log record %d: %s", index, exc)
                return
            if isinstance(record, Proposal) and record.kind == "lead" and record.binds:
                self._binds[(record.term, record.attempt, record.replica)] = record.binds
                if len(self._binds) > 64:  # only the last cells can be lost in flight
                    for key in sorted(self._binds)[:-32]:
                        del self._binds[key]
            events = self.election.apply(record)
            payload: dict[str, Any] | None = None
            for event in events:
                if isinstance(event, Completed) and event.record.sync:
                    payload = self._merge(event.record)
        self._loop.call_soon_threadsafe(self._deliver, events, payload)

    def _merge(self, done: Done) -> dict[str, Any] | None:
        try:
            payload: dict[str, Any] = dict(decode_payload(done.sync or b""))
        except ValueError as exc:
            self.rejected += 1
            log.error("term %d: rejected its state update: %s", done.term, exc)
            return None
        self.state.merge(payload)
        return payload

    def snapshot(self) -> bytes:
        with self._lock:
            data: bytes = msgpack.packb(
                {"election": self.election.snapshot(), "state": self.state.to_primitive()},
                use_bin_type=True,
            )
            return data

    def restore(self, data: bytes) -> None:
        with self._lock:
            snapshot = msgpack.unpackb(data, raw=False)
            self.election = ElectionLog.restore(snapshot["election"])
            self.state = MergedState.from_primitive(snapshot["state"])
            full_state: dict[str, Any] = dict(self.state.to_payload(self.election.last_done_count))
            done_term = self.election.last_done_term
        self._loop.call_soon_threadsafe(self._deliver_restore, done_term, full_state)

    # -- event loop -----------------------------------------------------------------------

    def _deliver(self, events: list[Event], payload: dict[str, Any] | None) -> None:
        for event in events:
            if isinstance(event, Decided):
                self.decisions[(event.term, event.attempt)] = event.winner
            elif isinstance(event, Failed):
                self.decisions[(event.term, event.attempt)] = None
            elif isinstance(event, Completed):
                self.done_term = event.record.term
                self.done_count = event.record.execution_count
                if event.record.replica != self.replica_id:
                    # A cell that changed no variable has no payload but still moves the count.
                    self._on_state(payload, event.record.execution_count)
                    self.states_loaded += 1
            elif isinstance(event, Ignored):
                log.debug("log: %s", event.reason)
        if len(self.decisions) > _KEEP_DECISIONS * 2:
            # Only recent terms are ever looked up (a kernel runs one cell at a time): keep
            # the map, scanned by resent cells and by the lost-state warning, from growing
            # with the kernel's life.
            oldest = self.done_term - _KEEP_DECISIONS
            for key in [k for k in self.decisions if k[0] < oldest]:
                del self.decisions[key]
        self._changed.set()

    def _deliver_restore(self, done_term: int, full_state: dict[str, Any]) -> None:
        self.done_term = done_term
        self.done_count = int(full_state["count"])
        self._on_state(full_state, self.done_count)
        self.states_loaded += 1
        self._changed.set()

    async def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = self._loop.time() + timeout
        while not condition():
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return condition()
        return True

    async def decision(self, term: int, attempt: int, timeout: float) -> str | None:
        """The winner of (term, attempt) once committed; ``None`` if everybody yielded.

        Raises ``TimeoutError`` if it is not decided in time.
        """
        key = (term, attempt)
        if not await self._wait(lambda: key in self.decisions or self.done_term >= term, timeout):
            raise TimeoutError(f"term {term} attempt {attempt} was not decided in {timeout:g} s")
        if key not in self.decisions:
            return None
        return self.decisions[key]

    def bound_by(self, term: int) -> tuple[str, ...]:
        """The names the winning lead of ``term`` said its cell binds (empty if unknown)."""
        with self._lock:
            for (t, attempt), winner in self.decisions.items():
                if t == term and winner is not None:
                    names = self._binds.get((t, attempt, winner))
                    if names:
                        return names
        return ()

    async def caught_up(self, term: int, timeout: float) -> bool:
        """Wait until the state of every cell up to ``term`` has been applied here."""
        return await self._wait(lambda: self.done_term >= term, timeout)
