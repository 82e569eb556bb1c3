"""The replicated log on Raft, through pysyncobj 0.3.17.

Over 500 lines, knowingly: the adapter and the node subclass that overrides pysyncobj's
private membership handling (``_RaftNode``) read each other's state under one lock and one
tick thread; splitting them would spread one protocol over two files. Issue 11's gateway
refactor is the place to revisit it.

One :class:`PySyncObjLog` is one replica's Raft node: a ``SyncObj`` with its own tick thread
(``autoTick``), TCP transport encrypted with the shared password, and one consumer object
(:class:`_LogConsumer`) that carries the application's :class:`~._interface.LogStateMachine`.

How the pieces map onto pysyncobj:

* **Records.** The consumer has one ``@replicated`` method, ``commit_record(data)``. Proposing a
  record calls it with a callback; pysyncobj pickles ``(method id, (data,))`` into the Raft log
  and, once the entry is committed, runs the method on every node, in log order, in the node's
  tick thread. The method counts application records and calls ``state.apply(index, data)``
  with that count, so record indexes are 1, 2, 3 ... without the gaps that Raft's own no-op
  and membership entries would leave.
* **Snapshots.** When pysyncobj compacts its log (more than ``compaction_entries`` entries, or
  :meth:`PySyncObjLog.compact`), it asks each consumer for ``_serialize()``; ours returns
  ``{"v": 1, "records": <records applied>, "state": state.snapshot()}``. pysyncobj stores it
  with its own bookkeeping (last applied entry, cluster members) in memory or in the
  ``fullDumpFile``, drops the log up to that point, and ships the same dump to any follower
  whose next entry was compacted away (a new member, a restarted or long-cut-off one). The
  follower's ``_deserialize()`` calls ``state.restore(...)`` and resets the record counter, and
  the node carries on with the entries after the snapshot. A restarted node with a ``data_dir``
  does the same from its own dump file, then replays its journal.
* **Membership.** pysyncobj applies a membership entry when it is appended and undoes it when it
  is truncated, which corrupts the view of a member that joined late (it replays the whole
  membership history on top of the current membership). :class:`_RaftNode` recomputes the
  view from the log instead: a base membership at a known position plus the later
  ``add``/``rem`` entries; a node keeps the membership it was started with until it has caught
  up. Snapshots carry the membership at their position. See docs/consensus.md, "Membership is
  a function of the log".
* **Commit notification.** pysyncobj calls the proposal's callback in the tick thread; the
  callback hands ``(result, reason)`` to the asyncio loop the log was created on with
  ``loop.call_soon_threadsafe``.

Retries and duplicates: :meth:`PySyncObjLog.propose` resubmits the record after a failure that
does not say it was dropped for good (no leader yet, leader changed, queue full, unknown
outcome). Some of those (``LEADER_CHANGED``, ``UNKNOWN_OUTCOME``) are reported after the record
may already have reached the new leader's log, so **a retried record may commit twice**; the
application's records carry ids and applying one twice must be harmless. A proposal that timed
out may also still commit later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import pysyncobj

from ._interface import LogError, LogStateMachine
from ._raft_port import GuardedTransport

__all__ = ["PySyncObjLog"]

log = logging.getLogger(__name__)

# pysyncobj has no type information; these typed aliases keep the untyped surface in one place.
_SyncObj: Any = pysyncobj.SyncObj
_SyncObjConf: Any = pysyncobj.SyncObjConf
_Node: Any = pysyncobj.node.Node
_replicated: Callable[[Callable[..., Any]], Callable[..., Any]] = pysyncobj.replicated

#: pysyncobj's ``FAIL_REASON`` codes by name (0.3.17).
_REASONS: Final[dict[int, str]] = {
    0: "SUCCESS",
    1: "QUEUE_FULL",
    2: "MISSING_LEADER",
    3: "DISCARDED",
    4: "NOT_LEADER",
    5: "LEADER_CHANGED",
    6: "REQUEST_DENIED",
    7: "UNKNOWN_OUTCOME",
}
_SUCCESS: Final = 0
_REQUEST_DENIED: Final = 6
#: Failures after which a proposal is submitted again (DISCARDED: another entry took its
#: place in the log, so it did not commit and resubmitting cannot duplicate it).
_RETRIABLE: Final = frozenset({1, 2, 3, 4, 5, 7})

#: The first byte of pysyncobj's membership entries (``_COMMAND_TYPE.MEMBERSHIP``).
_MEMBERSHIP_ENTRY: Final = bytes([pysyncobj._COMMAND_TYPE.MEMBERSHIP])

_RETRY_FIRST_DELAY = 0.02
_RETRY_MAX_DELAY = 0.1
_SNAPSHOT_FORMAT = 1

#: The line pysyncobj 0.3.17 logs at CRITICAL whenever a follower re-writes entries it has
#: already applied with identical ones (it truncates before comparing terms). Measured to be
#: noise (state machines stay identical); see docs/consensus.md.
_TRUNCATION_NOISE = "truncating already-applied log entries"


class _TruncationNoiseFilter(logging.Filter):
    """Drops only pysyncobj's "truncating already-applied log entries" line, and counts it."""

    suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_TRUNCATION_NOISE):
            type(self).suppressed += 1
            return False
        return True


def _install_noise_filter() -> None:
    target = logging.getLogger("pysyncobj.syncobj")
    if not any(isinstance(f, _TruncationNoiseFilter) for f in target.filters):
        target.addFilter(_TruncationNoiseFilter())


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"a replica address is 'host:port', got {address!r}")
    return host, int(port)


class _LogConsumer(pysyncobj.SyncObjConsumer):  # type: ignore[misc]  # untyped base
    """The application's state machine as pysyncobj sees it: one replicated method and the
    snapshot hooks. Everything here runs in the SyncObj's tick thread."""

    def __init__(self, state: LogStateMachine) -> None:
        super().__init__()
        self._state = state
        #: Application records applied so far: the index of the last one.
        self.records = 0
        #: Snapshots installed (a follower catching up, or a restart from the dump file).
        self.restores = 0
        #: The membership at the snapshot's position, for the snapshot (set by _RaftNode).
        self.members_at_snapshot: Callable[[], list[str]] | None = None
        #: The membership stored in the snapshot being installed (None: an older snapshot).
        self.restored_members: list[str] | None = None

    @_replicated
    def commit_record(self, data: bytes) -> int:
        self.records += 1
        index = self.records
        try:
            self._state.apply(index, data)
        except Exception:
            # Every replica applies the same record to the same state, so a failing apply
            # fails everywhere; retrying would wedge the log, so it counts as applied.
            log.exception("the state machine failed to apply record %d", index)
        return index

    def _serialize(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {
            "v": _SNAPSHOT_FORMAT,
            "records": self.records,
            "state": self._state.snapshot(),
        }
        if self.members_at_snapshot is not None:
            snapshot["members"] = self.members_at_snapshot()
        return snapshot

    def _deserialize(self, data: Any) -> None:
        self.restored_members = None
        if not isinstance(data, dict) or data.get("v") != _SNAPSHOT_FORMAT:
            raise ValueError(f"not an nbcluster log snapshot: {type(data).__name__}")
        records, state = data["records"], data["state"]
        members = data.get("members")
        if not isinstance(records, int) or not isinstance(state, bytes):
            raise ValueError("malformed nbcluster log snapshot")
        if members is not None and not (
            isinstance(members, list) and all(isinstance(m, str) for m in members)
        ):
            raise ValueError("malformed nbcluster log snapshot: members")
        self._state.restore(state)
        self.records = records
        self.restores += 1
        self.restored_members = members


class _RaftNode(_SyncObj):  # type: ignore[misc]  # untyped base
    """pysyncobj's ``SyncObj`` whose membership is a function of its log.

    pysyncobj 0.3.17 applies a membership entry to the node's view (``otherNodes``) when the
    entry is appended and undoes it when the entry is truncated. Both are wrong for a member
    that joined late: it starts with the current membership, then receives every earlier
    membership entry; an old ``add`` of a member that is still there changes nothing, but
    undoing it (when the leader re-sends a range the member has) drops that member. Here the
    view is recomputed instead, as *base* (a membership at a known log position) plus the
    ``add``/``rem`` entries after that position that are in the log now, applied as set
    operations; see docs/consensus.md, "Membership is a function of the log".

    The overrides replace pysyncobj's private (name-mangled) methods; every one runs in the
    tick thread. Attributes are set before ``SyncObj.__init__``: it starts the tick thread,
    and it leaves the attributes that exist by the end of its ``__init__`` out of its dumps.
    """

    def __init__(
        self, self_address: str, others: list[str], conf: Any, consumer: _LogConsumer
    ) -> None:
        self._self_address = self_address
        self._consumer = consumer
        #: The members other than this node at log position ``_base_index``.
        self._base: frozenset[str] = frozenset(others)
        self._base_index = 0
        #: The membership this node was started with: its view until it has caught up.
        self._configured: frozenset[str] = frozenset(others)
        #: Membership entries after ``_base_index``: (index, "add"/"rem", address), in log
        #: order, every one up to the entry ``_known`` (index, term) included.
        self._changes: list[tuple[int, str, str]] = []
        self._known: tuple[int, int] = (0, -1)
        #: What the view was last computed from (see _sync_members).
        self._synced_from: tuple[Any, ...] = ()
        self._base_epoch = 0
        #: The membership of a dump being loaded, as pysyncobj stored it.
        self._dump_members: frozenset[str] | None = None
        consumer.members_at_snapshot = self._members_at_last_applied
        # The Raft port checks a peer's frames' sizes and password before it buffers them.
        super().__init__(
            self_address, others, conf, consumers=[consumer], transportClass=GuardedTransport
        )

    # -- the view -----------------------------------------------------------------------------

    def _sync_members(self) -> None:
        """Make the view what the log says (cheap when nothing changed since the last call)."""
        raft_log = self._SyncObj__raftLog
        first, last = raft_log[0], raft_log[-1]
        # A node keeps the membership it was started with until it has caught up with the
        # leader (pysyncobj's isReady, which stays true). A new member's log starts with
        # history that this membership already includes, and the snapshot it may install can
        # be older than its own ``add``: the membership there may lack the leader itself.
        held = not self.isReady()
        key = (first[1], last[1], last[2], held, self._base_epoch)
        if key == self._synced_from:
            return
        self._synced_from = key
        self._scan()
        self._set_view(set(self._configured) if held else self._membership_at())

    def _scan(self) -> None:
        """Bring ``_changes`` up to date with the log.

        Only entries after ``_known`` are read. The changes up to the last applied entry are
        final: pysyncobj may truncate applied entries on a follower (the leader re-sends a
        range the follower has; it deletes and re-appends them), but they are committed, so
        they come back identical. Later ones are dropped if the log no longer holds the entry
        ``_known`` with the same term (an entry's index and term identify the log up to it,
        Raft's log matching property), and read again."""
        raft_log = self._SyncObj__raftLog
        first, last = raft_log[0][1], raft_log[-1]
        applied = int(self._SyncObj__raftLastApplied)
        known, term = self._known
        if known > applied and not (
            first <= known <= last[1] and raft_log[known - first][2] == term
        ):
            self._changes = [c for c in self._changes if c[0] <= applied]
            known = max(applied, self._base_index)
            self._known = (known, -1)
        if last[1] <= known:
            return
        parse = self._SyncObj__parseChangeClusterRequest
        for command, index, _term in raft_log[max(known + 1, first) - first :]:
            if command[:1] == _MEMBERSHIP_ENTRY and index > self._base_index:
                request = parse(command)
                self._changes.append((index, str(request[0]), str(request[1])))
        self._known = (last[1], last[2])

    def _membership_at(self, index: int | None = None) -> set[str]:
        """The members other than this node after the log entry ``index`` (default: after
        every change known)."""
        members = set(self._base)
        for entry_index, kind, address in self._changes:
            if index is not None and entry_index > index:
                break
            if kind == "add":
                members.add(address)
            elif kind == "rem":
                members.discard(address)
        members.discard(self._self_address)
        return members

    def _members_at_last_applied(self) -> list[str]:
        """For a snapshot: pysyncobj takes it at the last applied entry."""
        self._scan()
        at = self._membership_at(int(self._SyncObj__raftLastApplied))
        return sorted(at | {self._self_address})

    def _set_view(self, members: set[str]) -> None:
        """Add and drop nodes as pysyncobj's own membership change does."""
        others: set[Any] = self._SyncObj__otherNodes
        current = {str(node.id) for node in others}
        if current == members:
            return
        transport = self._SyncObj__transport
        for node in [n for n in others if str(n.id) not in members]:
            others.discard(node)
            self._SyncObj__raftNextIndex.pop(node, None)
            self._SyncObj__raftMatchIndex.pop(node, None)
            self._SyncObj__connectedNodes.discard(node)
            transport.dropNode(node)
        for address in sorted(members - current):
            node = self._SyncObj__nodeClass(address)
            others.add(node)
            self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
            self._SyncObj__raftMatchIndex[node] = 0
            if self._isLeader():
                self._SyncObj__lastResponseTime[node] = time.monotonic()
            transport.addNode(node)
        log.debug("Raft node %s: members now %s", self._self_address, sorted(members))

    # -- pysyncobj's membership handling, replaced --------------------------------------------

    def _SyncObj__doChangeCluster(self, request: Any, reverse: bool = False) -> bool:
        # pysyncobj calls this on a follower for appended entries (reverse=False), for
        # truncated ones (reverse=True) and again when an entry is applied: the view follows
        # the log in _sync_members instead.
        return False

    def _SyncObj__changeCluster(self, request: Any) -> bool:
        """The leader, before appending a membership entry: is the change allowed?"""
        noop = self._SyncObj__noopIDx
        if noop is None or self._SyncObj__raftLastApplied < noop:
            return False  # this leader's first entry is not committed yet
        self._sync_members()
        if not self.isReady():
            return False
        commit = self._SyncObj__raftCommitIndex
        if any(index > commit for index, _kind, _address in self._changes):
            return False  # one change at a time: an earlier one is not committed yet
        kind, address = str(request[0]), str(request[1])
        members = self._membership_at()
        if address == self._self_address:
            return False
        if kind == "add" and address not in members:
            members.add(address)
        elif kind == "rem" and address in members:
            members.discard(address)
        else:
            return False
        # The entry is appended right after this returns; the view changes with it, as in
        # pysyncobj (_sync_members then finds it already so).
        self._set_view(members)
        return True

    def _SyncObj__updateClusterConfiguration(self, new_nodes: Any) -> None:
        # Called at the end of a successful dump load, with the membership pysyncobj stored:
        # its view when the dump was taken, which may be ahead of the dump's position.
        self._dump_members = frozenset(
            str(n.id) if isinstance(n, _Node) else str(n) for n in new_nodes
        )

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # pysyncobj's keyword
        self._dump_members = None
        _SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        if self._dump_members is None:
            return  # the load failed (pysyncobj logged it); nothing changed
        restored = self._consumer.restored_members
        members = self._dump_members if restored is None else frozenset(restored)
        self._base = members - {self._self_address}
        self._base_index = int(self._SyncObj__raftLastApplied)
        self._base_epoch += 1
        self._changes, self._known = [], (self._base_index, -1)
        self._sync_members()

    def _SyncObj__deleteEntriesTo(self, to_index: int) -> None:
        # Log compaction drops the entries before to_index: fold their changes into the base.
        self._scan()
        if to_index - 1 > self._base_index:
            self._base = frozenset(self._membership_at(to_index - 1))
            self._base_index = to_index - 1
            self._changes = [c for c in self._changes if c[0] > self._base_index]
            self._base_epoch += 1
        _SyncObj._SyncObj__deleteEntriesTo(self, to_index)

    # -- where the log changes ----------------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        _SyncObj._SyncObj__onMessageReceived(self, node, message)
        self._sync_members()

    def _checkCommandsToApply(self) -> None:
        super()._checkCommandsToApply()
        self._sync_members()


class PySyncObjLog:
    """A replica's member of its kernel's Raft log (see the module docstring).

    Create it from the asyncio loop that will await it: the constructor captures the running
    loop, binds ``self_address`` and starts the node's tick thread. Startup is quick but not
    free (the password's key derivation takes tens of milliseconds).

    ``peers`` are the other members' ``host:port`` addresses (``self_address`` may be among
    them). ``password`` encrypts all Raft traffic; a node with another password cannot
    connect. ``data_dir`` keeps the Raft journal and the last snapshot on disk (one directory
    per node), so a restarted node resumes; without it everything is in memory and a restarted
    node is brought up to date by the others. ``compaction_entries`` is the number of log
    entries after which the log is compacted into a snapshot.

    The state machine is called from the tick thread: ``apply`` for each committed record,
    ``snapshot`` at compaction, ``restore`` when a snapshot is installed. After a restart it is
    replayed from the last snapshot, so give a restarted node a fresh state machine.
    """

    def __init__(
        self,
        self_address: str,
        peers: Sequence[str],
        password: str,
        state: LogStateMachine,
        *,
        data_dir: Path | None = None,
        election_timeout: tuple[float, float] = (0.5, 1.5),
        compaction_entries: int = 1000,
        leader_fallback_timeout: float = 3.0,
        connection_retry: float = 1.0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        host, _port = _split_address(self_address)
        for peer in peers:
            _split_address(peer)
        if not password:
            raise ValueError("a password is required: it encrypts and authenticates Raft traffic")
        low, high = election_timeout
        if not 0 < low < high:
            raise ValueError(
                f"election_timeout must be (low, high) with 0 < low < high: {low}, {high}"
            )
        if compaction_entries < 2:
            raise ValueError("compaction_entries must be at least 2")
        if leader_fallback_timeout <= 0 or connection_retry <= 0:
            raise ValueError("timeouts must be positive")

        self.address = self_address
        self._closed = False
        self._pending: set[asyncio.Future[tuple[Any, int]]] = set()
        self._consumer = _LogConsumer(state)
        # Heartbeats must come well inside the shortest election timeout (pysyncobj asserts
        # raftMinTimeout > 3 * appendEntriesPeriod), and a connection may only be declared
        # dead after the longest one (connectionTimeout >= raftMaxTimeout).
        append_period = min(0.1, low / 4)
        files: dict[str, str] = {}
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            files = {
                "journalFile": str(data_dir / "raft.journal"),
                "fullDumpFile": str(data_dir / "raft.snapshot"),
            }
        conf = _SyncObjConf(
            password=password,
            bindAddress=self_address,
            appendEntriesUseBatch=False,
            useFork=False,
            dynamicMembershipChange=True,
            raftMinTimeout=low,
            raftMaxTimeout=high,
            appendEntriesPeriod=append_period,
            connectionTimeout=max(3.5, high),
            connectionRetryTime=connection_retry,
            leaderFallbackTimeout=max(leader_fallback_timeout, 2 * append_period),
            commandsWaitLeader=False,
            logCompactionMinEntries=compaction_entries,
            maxBindRetries=1,
            **files,
        )
        _install_noise_filter()
        others = [p for p in dict.fromkeys(peers) if p != self_address]
        log.debug("starting Raft node %s (bind %s) with peers %s", self_address, host, others)
        self._obj: Any = _RaftNode(self_address, others, conf, self._consumer)
        try:
            self._obj.waitBinded()
        except Exception as exc:
            self._closed = True
            self._obj.destroy()
            with contextlib.suppress(Exception):
                self._obj._doDestroy()  # the tick thread gave up before it could
            self._close_pipe()
            raise LogError(f"Raft node {self_address}: cannot bind the address ({exc})") from exc

    # -- the ReplicatedLog protocol ---------------------------------------------------------

    async def propose(self, data: bytes, timeout: float) -> None:
        """Append ``data`` and return once it is committed (and applied on this node).

        Resubmits after transient failures until ``timeout``; a resubmitted record may commit
        twice (see the module docstring). Raises :class:`LogError` naming the last failure."""
        if not isinstance(data, bytes):
            raise TypeError(f"log records are bytes, not {type(data).__name__}")

        def submit(callback: Callable[[Any, int], None]) -> None:
            self._consumer.commit_record(data, callback=callback)

        await self._run("proposal", submit, timeout)

    async def add_member(self, address: str, timeout: float) -> None:
        """Add ``address`` to the cluster (from an existing member; one change at a time).
        Start the new node afterwards, with every member (itself included) as its peers."""
        _split_address(address)
        if address in self._members():
            raise LogError(f"cannot add {address}: already a member")

        def submit(callback: Callable[[Any, int], None]) -> None:
            self._obj.addNodeToCluster(address, callback=callback)

        await self._run(
            f"adding {address}", submit, timeout, done=lambda: address in self._members()
        )

    async def remove_member(self, address: str, timeout: float) -> None:
        """Remove a stopped member ``address`` (from one of the remaining members)."""
        if address == self.address:
            raise LogError("a member cannot remove itself; remove it from another member")
        if address not in self._members():
            raise LogError(f"cannot remove {address}: not a member")

        def submit(callback: Callable[[Any, int], None]) -> None:
            self._obj.removeNodeFromCluster(address, callback=callback)

        await self._run(
            f"removing {address}", submit, timeout, done=lambda: address not in self._members()
        )

    def status(self) -> dict[str, Any]:
        """Diagnostics. ``leader`` is this node's *belief* and may be stale or shared by two
        nodes for a moment; never decide anything from it (decide from committed records)."""
        obj = self._obj
        leader = obj._getLeader()
        return {
            "backend": "pysyncobj",
            "self": self.address,
            "leader": None if leader is None else str(leader.id),
            "term": int(obj.raftCurrentTerm),
            "commit_index": int(obj.raftCommitIndex),
            "last_applied": int(obj.raftLastApplied),
            "records_applied": self._consumer.records,
            "snapshots_restored": self._consumer.restores,
            "members": sorted(self._members()),
            "has_quorum": bool(obj.hasQuorum),
            "ready": bool(obj.isReady()),
            "closed": self._closed,
            # Raft-port connections closed for what they sent (docs/security.md).
            "refused_connections": int(getattr(obj._SyncObj__transport, "refused_count", 0)),
        }

    async def close(self) -> None:
        """Stop the node: its tick thread closes the sockets and the journal, then exits.
        Pending proposals fail with :class:`LogError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(LogError(f"Raft node {self.address} closed"))
        # destroy_synchronous() flags the tick thread, which closes the sockets and the
        # journal on its next tick (at most autoTickPeriod away), and joins it.
        try:
            await asyncio.wait_for(asyncio.to_thread(self._obj.destroy_synchronous), 5.0)
        except TimeoutError:
            log.warning("Raft node %s: tick thread still running after close", self.address)
        else:
            self._close_pipe()

    # -- extras -------------------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> None:
        """Wait until this node knows a leader and has applied what the leader had committed
        when it first heard from it. Raises :class:`LogError` after ``timeout``."""
        deadline = self._loop.time() + timeout
        while not (self._obj.isReady() and self._obj._getLeader() is not None):
            if self._closed:
                raise LogError(f"Raft node {self.address} closed")
            if self._loop.time() >= deadline:
                raise LogError(f"Raft node {self.address}: no leader after {timeout:g} s")
            await asyncio.sleep(0.01)

    def compact(self) -> None:
        """Ask for a log compaction (a snapshot) at the next tick, whatever the log's size."""
        self._obj.forceLogCompaction()

    # -- internals ----------------------------------------------------------------------------

    def _members(self) -> set[str]:
        return {self.address} | {str(node.id) for node in self._obj.otherNodes}

    async def _run(
        self,
        what: str,
        submit: Callable[[Callable[[Any, int], None]], None],
        timeout: float,
        done: Callable[[], bool] | None = None,
    ) -> None:
        """Submit through pysyncobj until it reports success, a permanent failure, or the
        deadline passes. ``done`` says whether an earlier attempt has taken effect after all
        (membership changes are idempotent that way)."""
        loop = self._loop
        deadline = loop.time() + timeout
        delay = _RETRY_FIRST_DELAY
        last = "no attempt"
        while True:
            if self._closed:
                raise LogError(f"{what} failed: Raft node {self.address} is closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LogError(f"{what} not committed within {timeout:g} s (last failure: {last})")
            fut: asyncio.Future[tuple[Any, int]] = loop.create_future()
            self._pending.add(fut)
            try:
                submit(self._bridge(fut))
                async with asyncio.timeout(remaining):
                    _result, reason = await fut
            except TimeoutError:
                raise LogError(
                    f"{what} not committed within {timeout:g} s (last failure: "
                    f"{'no reply' if last == 'no attempt' else last}; the record may still "
                    "commit)"
                ) from None
            finally:
                self._pending.discard(fut)
            if reason == _SUCCESS:
                return
            last = _REASONS.get(reason, str(reason))
            if done is not None and done():
                return
            if reason not in _RETRIABLE and not (done is not None and reason == _REQUEST_DENIED):
                # Membership changes are denied while an earlier change or the new leader's
                # first entry is still uncommitted: those denials are worth waiting out.
                raise LogError(f"{what} failed: {last}")
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, _RETRY_MAX_DELAY)

    def _bridge(self, fut: asyncio.Future[tuple[Any, int]]) -> Callable[[Any, int], None]:
        """A pysyncobj callback (called in the tick thread) that settles ``fut`` on the loop."""

        def settle(result: Any, reason: int) -> None:
            if not fut.done():
                fut.set_result((result, reason))

        def callback(result: Any, reason: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                self._loop.call_soon_threadsafe(settle, result, reason)

        return callback

    def _close_pipe(self) -> None:
        # pysyncobj 0.3.17 never closes the wake-up pipe it creates when appendEntriesUseBatch
        # is off; close it once the tick thread is gone so that nodes do not leak descriptors.
        notifier = getattr(self._obj, "_SyncObj__pipeNotifier", None)
        for name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
            fd = getattr(notifier, name, None)
            if isinstance(fd, int):
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(notifier, name, None)
