"""The replicated log a kernel's replicas share, as the rest of nbcluster sees it.

A kernel's replicas agree on one ordered log of small records (election proposals, cell
completions with state updates). The application supplies a :class:`LogStateMachine`; the log
feeds it every committed record, in log order, on every replica, and asks it for snapshots so
that a replica that fell behind (or a new one) can catch up without the whole log.

Implementations: :class:`~nbcluster.consensus.PySyncObjLog` (Raft via pysyncobj, used by the
replicas) and :class:`~nbcluster.consensus.InMemoryLog` (one process, deterministic, for tests).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["LogError", "LogStateMachine", "ReplicatedLog"]


class LogError(RuntimeError):
    """A proposal or membership change did not commit (no leader, timeout, closed log ...)."""


class LogStateMachine(Protocol):
    """What the application gives the log. All three methods are called from the log's own
    thread, never concurrently, in log order; they must be fast and must not block."""

    def apply(self, index: int, data: bytes) -> None:
        """A record committed at ``index`` (1-based, increasing, each index once)."""

    def snapshot(self) -> bytes:
        """The application state after every record applied so far."""

    def restore(self, data: bytes) -> None:
        """Replace the application state with a snapshot's (a replica catching up)."""


class ReplicatedLog(Protocol):
    """One replica's member of the log. Created with its own address, the peers' addresses,
    the shared password and a :class:`LogStateMachine`."""

    async def propose(self, data: bytes, timeout: float) -> None:
        """Append ``data``; returns once it is committed (applied locally need not have
        happened yet). Retries while there is no leader; raises :class:`LogError` after
        ``timeout`` seconds."""

    async def add_member(self, address: str, timeout: float) -> None:
        """Add a replica (one change at a time; called on an existing member)."""

    async def remove_member(self, address: str, timeout: float) -> None:
        """Remove a replica that has been stopped (called on a remaining member)."""

    def status(self) -> dict[str, Any]:
        """Diagnostics: self address, leader, raft term, commit/applied index, members."""

    async def close(self) -> None:
        """Leave: stop the node's thread and sockets. The other members carry on."""
