"""The two doors through which state reaches a replica, each sealing what leaves and opening
what arrives (``_seal``): the object store (:class:`SealedStore`) and the Raft log
(:class:`SealedLog` for what the replica proposes, :class:`SealedLogState` for what commits).
The replica group puts them around the real store, log and coordinator, so that nothing
leaves unsealed and the synchroniser, the coordinator and the checkpoint code never see a
byte that did not open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..store import ObjectInfo, ObjectStore
from ._seal import (
    RAFT_RECORD,
    RAFT_SNAPSHOT,
    ForgedState,
    Refusals,
    open_sealed,
    seal,
    store_context,
)

if TYPE_CHECKING:
    from ..consensus import LogStateMachine, ReplicatedLog

__all__ = ["SealedLog", "SealedLogState", "SealedStore"]


class SealedStore:
    """An :class:`~nbcluster.store.ObjectStore` whose objects are sealed, each bound to its
    key: ``put`` seals, ``get`` opens (a refused object raises :class:`~._seal.ForgedState`,
    a ``ValueError``, after it is counted and logged). ``list`` reports the stored sizes
    (``HEADER_SIZE`` more than the data)."""

    def __init__(self, inner: ObjectStore, key: bytes, refusals: Refusals) -> None:
        self.inner = inner
        self._key = key
        self.refusals = refusals

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, seal(self._key, store_context(key), data))

    def get(self, key: str) -> bytes:
        sealed = self.inner.get(key)
        try:
            return open_sealed(self._key, store_context(key), sealed, name=key)
        except ForgedState as exc:
            self.refusals.note(exc)
            raise

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)


class SealedLogState:
    """The state machine the Raft log is given: it opens each committed record before the
    coordinator decodes it, and seals and opens snapshots. A record that does not open is
    refused (counted, logged) and not applied: every replica holds the same key, so every
    replica refuses the same records and their states stay equal."""

    def __init__(self, inner: LogStateMachine, key: bytes, refusals: Refusals) -> None:
        self.inner = inner
        self._key = key
        self.refusals = refusals

    def apply(self, index: int, data: bytes) -> None:
        try:
            record = open_sealed(self._key, RAFT_RECORD, data, name=f"Raft log record {index}")
        except ForgedState as exc:
            self.refusals.note(exc)
            return
        self.inner.apply(index, record)

    def snapshot(self) -> bytes:
        return seal(self._key, RAFT_SNAPSHOT, self.inner.snapshot())

    def restore(self, data: bytes) -> None:
        try:
            snapshot = open_sealed(self._key, RAFT_SNAPSHOT, data, name="a Raft log snapshot")
        except ForgedState as exc:
            # Nothing of it is installed; the log layer reports the failure.
            self.refusals.note(exc)
            raise
        self.inner.restore(snapshot)


class SealedLog:
    """A replica's Raft log as its group uses it: every record it proposes is sealed (the
    other replicas' :class:`SealedLogState` refuses one that is not); the rest is the log's."""

    def __init__(self, inner: ReplicatedLog, key: bytes) -> None:
        self.inner = inner
        self._key = key

    async def propose(self, data: bytes, timeout: float) -> None:
        await self.inner.propose(seal(self._key, RAFT_RECORD, data), timeout)

    async def add_member(self, address: str, timeout: float) -> None:
        await self.inner.add_member(address, timeout)

    async def remove_member(self, address: str, timeout: float) -> None:
        await self.inner.remove_member(address, timeout)

    def status(self) -> dict[str, Any]:
        return self.inner.status()

    async def close(self) -> None:
        await self.inner.close()

    def compact(self) -> None:
        """Ask for a snapshot now, where the log can (``PySyncObjLog.compact``)."""
        compact = getattr(self.inner, "compact", None)
        if compact is not None:
            compact()
