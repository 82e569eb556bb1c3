"""A replicated log in one process, for tests: deterministic, no threads, no sockets.

An :class:`InMemoryLogGroup` is the "cluster": one ordered list of entries shared by its
members (:class:`InMemoryLog`). A proposal that can commit is appended and applied, before
``propose`` returns, to the state machine of every member that is running, in the group and
not cut off, in log order. What it models of Raft:

* **Quorum.** An entry commits only if its proposer is a running, reachable member and more
  than half of the group's members are running and reachable. Otherwise ``propose`` waits
  (for a heal, a restart, a membership change) and raises :class:`LogError` at its timeout.
* **Partitions.** :meth:`InMemoryLogGroup.partition` cuts a member off: it receives nothing
  and cannot commit. :meth:`~InMemoryLogGroup.heal` reconnects it and it catches up at once.
* **Snapshots and compaction.** Every ``compaction_entries`` entries (or on
  :meth:`~InMemoryLogGroup.compact`) the group takes the snapshot of an up-to-date member and
  compacts the log behind it. A member whose next entry was compacted away (added late,
  restarted with a fresh state machine, cut off for long) gets ``restore(snapshot)`` and then
  the entries after it, as with pysyncobj.
* **Membership.** ``add_member``/``remove_member`` commit a membership entry (which does not
  count as a record: record indexes stay 1, 2, 3 ...). A member started before it was added,
  or after it was removed, is not part of the group: it waits, like a node nobody talks to.

Unlike the Raft log, state machines are called on the event loop's thread, synchronously
inside ``propose``/``heal``/``start`` — which is what makes tests deterministic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._interface import LogError, LogStateMachine

__all__ = ["InMemoryLog", "InMemoryLogGroup"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: Literal["record", "add", "remove"]
    data: bytes = b""
    address: str = ""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    position: int  # entries covered
    records: int  # records covered: the index of the last record in it
    state: bytes


class InMemoryLogGroup:
    """The shared log and membership of a group of :class:`InMemoryLog` members."""

    def __init__(self, members: Iterable[str] = (), *, compaction_entries: int = 1000) -> None:
        if compaction_entries < 1:
            raise ValueError("compaction_entries must be at least 1")
        self.compaction_entries = compaction_entries
        self._entries: list[_Entry] = []
        self._members: dict[str, None] = dict.fromkeys(members)
        self._nodes: dict[str, InMemoryLog] = {}
        self._partitioned: set[str] = set()
        self._snapshot: _Snapshot | None = None
        self._changed = asyncio.Event()
        self._leader: str | None = None
        self._term = 0

    @classmethod
    def create(
        cls,
        states: Sequence[LogStateMachine],
        *,
        addresses: Sequence[str] | None = None,
        compaction_entries: int = 1000,
    ) -> tuple[InMemoryLogGroup, list[InMemoryLog]]:
        """A group of ``len(states)`` members (addresses ``m1``, ``m2`` ... unless given),
        all started, with an empty log."""
        if addresses is None:
            addresses = [f"m{i + 1}" for i in range(len(states))]
        if len(addresses) != len(states):
            raise ValueError("one address per state machine")
        group = cls(addresses, compaction_entries=compaction_entries)
        return group, [group.start(a, s) for a, s in zip(addresses, states, strict=True)]

    # -- the test's switches ------------------------------------------------------------------

    def start(self, address: str, state: LogStateMachine) -> InMemoryLog:
        """Start a node for ``address`` with a fresh state machine. A member catches up at
        once (snapshot, then the rest); a non-member waits until it is added."""
        current = self._nodes.get(address)
        if current is not None:
            raise ValueError(f"{address} is already running; close it first")
        node = InMemoryLog(self, address, state)
        self._nodes[address] = node
        self._topology_changed()
        return node

    def partition(self, member: InMemoryLog | str) -> None:
        """Cut ``member`` off from the others until :meth:`heal`."""
        self._partitioned.add(_address(member))
        self._topology_changed()

    def heal(self, member: InMemoryLog | str) -> None:
        """Reconnect ``member``; it catches up immediately."""
        self._partitioned.discard(_address(member))
        self._topology_changed()

    def compact(self) -> None:
        """Snapshot an up-to-date member now and compact the log behind it."""
        self._take_snapshot()

    @property
    def members(self) -> list[str]:
        return sorted(self._members)

    @property
    def records(self) -> list[bytes]:
        """Every record ever committed, in order (compaction does not forget them here)."""
        return [e.data for e in self._entries if e.kind == "record"]

    @property
    def snapshot_index(self) -> int:
        """Records covered by the latest snapshot (0: none taken)."""
        return 0 if self._snapshot is None else self._snapshot.records

    # -- internals ----------------------------------------------------------------------------

    def _reachable(self, address: str) -> bool:
        node = self._nodes.get(address)
        return (
            node is not None
            and not node.closed
            and address in self._members
            and address not in self._partitioned
        )

    def _blocked(self, node: InMemoryLog) -> str | None:
        """Why ``node`` cannot commit now, or None."""
        if node.closed:
            return "closed"
        if node.address not in self._members:
            return "not a member of the group"
        if node.address in self._partitioned:
            return "partitioned from the group"
        up = sum(1 for a in self._members if self._reachable(a))
        if up * 2 <= len(self._members):
            return f"no quorum ({up} of {len(self._members)} members reachable)"
        return None

    async def _commit(self, node: InMemoryLog, entry: _Entry, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (reason := self._blocked(node)) is not None:
            if node.closed:
                raise LogError(f"{node.address}: closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LogError(f"{node.address}: not committed within {timeout:g} s ({reason})")
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                raise LogError(
                    f"{node.address}: not committed within {timeout:g} s ({reason})"
                ) from None
        self._entries.append(entry)
        if entry.kind == "add":
            self._members[entry.address] = None
        elif entry.kind == "remove":
            self._members.pop(entry.address, None)
        self._deliver()
        if len(self._entries) - self._compacted_to() >= self.compaction_entries:
            self._take_snapshot()
        if entry.kind != "record":
            self._topology_changed()

    def _compacted_to(self) -> int:
        return 0 if self._snapshot is None else self._snapshot.position

    def _deliver(self) -> None:
        for address in sorted(self._nodes):
            if self._reachable(address):
                self._catch_up(self._nodes[address])

    def _catch_up(self, node: InMemoryLog) -> None:
        snap = self._snapshot
        if snap is not None and node.position < snap.position:
            node.install(snap)
        for entry in self._entries[node.position :]:
            node.apply_entry(entry)

    def _take_snapshot(self) -> None:
        end = len(self._entries)
        for address in sorted(self._nodes):
            node = self._nodes[address]
            if self._reachable(address) and node.position == end:
                self._snapshot = _Snapshot(end, node.records, node.state.snapshot())
                return

    def _topology_changed(self) -> None:
        self._deliver()
        reachable = [a for a in sorted(self._members) if self._reachable(a)]
        leader = reachable[0] if len(reachable) * 2 > len(self._members) else None
        if leader != self._leader:
            self._leader = leader
            if leader is not None:
                self._term += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _forget(self, node: InMemoryLog) -> None:
        if self._nodes.get(node.address) is node:
            del self._nodes[node.address]
        self._topology_changed()


def _address(member: InMemoryLog | str) -> str:
    return member if isinstance(member, str) else member.address


class InMemoryLog:
    """One member of an :class:`InMemoryLogGroup` (see the module docstring). Create members
    with :meth:`InMemoryLogGroup.create` or :meth:`InMemoryLogGroup.start`."""

    def __init__(self, group: InMemoryLogGroup, address: str, state: LogStateMachine) -> None:
        self.group = group
        self.address = address
        self.state = state
        self.closed = False
        #: Log entries consumed (records and membership entries).
        self.position = 0
        #: Records applied: the index of the last one.
        self.records = 0
        #: Snapshots installed.
        self.restores = 0

    async def propose(self, data: bytes, timeout: float) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"log records are bytes, not {type(data).__name__}")
        await self.group._commit(self, _Entry("record", data=data), timeout)

    async def add_member(self, address: str, timeout: float) -> None:
        if address in self.group._members:
            raise LogError(f"cannot add {address}: already a member")
        await self.group._commit(self, _Entry("add", address=address), timeout)

    async def remove_member(self, address: str, timeout: float) -> None:
        if address == self.address:
            raise LogError("a member cannot remove itself; remove it from another member")
        if address not in self.group._members:
            raise LogError(f"cannot remove {address}: not a member")
        await self.group._commit(self, _Entry("remove", address=address), timeout)

    def status(self) -> dict[str, Any]:
        group = self.group
        reachable = group._blocked(self) is None
        return {
            "backend": "memory",
            "self": self.address,
            "leader": group._leader if reachable else None,
            "term": group._term,
            "commit_index": len(group._entries) if reachable else self.position,
            "last_applied": self.position,
            "records_applied": self.records,
            "snapshots_restored": self.restores,
            "members": group.members,
            "has_quorum": reachable,
            "ready": reachable,
            "closed": self.closed,
            "refused_connections": 0,  # no port to attack
        }

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.group._forget(self)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until this member could commit (same contract as PySyncObjLog's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (reason := self.group._blocked(self)) is not None:
            remaining = deadline - loop.time()
            if self.closed or remaining <= 0:
                raise LogError(f"{self.address}: not ready ({reason})")
            changed = self.group._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                raise LogError(f"{self.address}: not ready ({reason})") from None

    # -- called by the group ------------------------------------------------------------------

    def install(self, snapshot: _Snapshot) -> None:
        self.state.restore(snapshot.state)
        self.position = snapshot.position
        self.records = snapshot.records
        self.restores += 1

    def apply_entry(self, entry: _Entry) -> None:
        self.position += 1
        if entry.kind != "record":
            return
        self.records += 1
        try:
            self.state.apply(self.records, entry.data)
        except Exception:
            log.exception(
                "%s: the state machine failed to apply record %d", self.address, self.records
            )
