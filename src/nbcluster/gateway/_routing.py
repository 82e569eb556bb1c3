"""Which client owns the reply to a request: pure bookkeeping, no I/O.

The gateway records each ``*_request`` it forwards (message id -> owner). A kernel's shell,
control and stdin messages carry the request's id as their parent; the owner receives them,
and a ``*_reply`` ends the entry. ``input_request`` on stdin does not end it: the execute
reply is still to come.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PendingRequest", "PendingRequests"]

Owner = TypeVar("Owner")


@dataclass(frozen=True, slots=True)
class PendingRequest(Generic[Owner]):
    msg_id: str
    msg_type: str
    channel: str
    header: bytes
    owner: Owner
    #: The replica expected to answer, when the kernel has several.
    replica: str | None = None


class PendingRequests(Generic[Owner]):
    """The open requests of one kernel, oldest first; bounded so that a kernel that never
    replies cannot grow it without limit."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._open: OrderedDict[str, PendingRequest[Owner]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(
        self,
        msg_id: str,
        msg_type: str,
        channel: str,
        header: bytes,
        owner: Owner,
        replica: str | None = None,
    ) -> None:
        self._open[msg_id] = PendingRequest(msg_id, msg_type, channel, header, owner, replica)
        while len(self._open) > self._limit:
            self._open.popitem(last=False)

    def route(self, parent_msg_id: str | None, msg_type: str) -> PendingRequest[Owner] | None:
        """The request a kernel message answers, removed when ``msg_type`` is a final reply."""
        if parent_msg_id is None:
            return None
        if msg_type.endswith("_reply"):
            return self._open.pop(parent_msg_id, None)
        return self._open.get(parent_msg_id)

    def drop_owner(self, owner: Owner) -> list[PendingRequest[Owner]]:
        """Forget every request of ``owner`` (its websocket closed)."""
        gone = [p for p in self._open.values() if p.owner is owner]
        for pending in gone:
            del self._open[pending.msg_id]
        return gone

    def take_for_replica(self, replica: str) -> list[PendingRequest[Owner]]:
        """Remove and return the requests a replica was to answer (it died)."""
        taken = [p for p in self._open.values() if p.replica == replica]
        for pending in taken:
            del self._open[pending.msg_id]
        return taken

    def take_all(self) -> list[PendingRequest[Owner]]:
        """Remove and return every open request (the kernel died or restarted)."""
        taken = list(self._open.values())
        self._open.clear()
        return taken
