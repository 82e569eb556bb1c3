"""One subscriber of a job's events (a server-sent-events stream or a followed log), with a
buffer bounded in bytes: a subscriber that falls that far behind (a client that stopped
reading) is dropped, not buffered without end. Nothing is lost by it: the job's log is kept in
the job store, and a dropped client may reconnect and read it from an offset."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["Subscription", "event_size"]

#: What an event costs besides its output text (its type, status and JSON framing).
_EVENT_OVERHEAD = 64


def event_size(event: dict[str, Any]) -> int:
    """The bytes ``event`` is accounted as in a subscriber's buffer."""
    data = event.get("data")
    return _EVENT_OVERHEAD + (len(data) if isinstance(data, str | bytes) else 0)


class Subscription:
    """Events for one subscriber, at most ``limit`` bytes of them buffered. An event that
    would take the buffer past ``limit`` drops the subscriber instead (``dropped`` is set and
    the buffer emptied); the publisher then forgets it. A single event larger than ``limit``
    is still taken into an empty buffer (a host's frame bounds its size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = asyncio.Event()
        self._events: deque[dict[str, Any]] = deque()
        self._size = 0
        self._ready = asyncio.Event()

    @property
    def buffered(self) -> int:
        """Bytes buffered now."""
        return self._size

    def empty(self) -> bool:
        return not self._events

    def offer(self, event: dict[str, Any]) -> bool:
        """Buffer ``event``; False (and dropped) if it does not fit."""
        if self.dropped.is_set():
            return False
        size = event_size(event)
        if self._events and self._size + size > self.limit:
            self.dropped.set()
            self._events.clear()
            self._size = 0
            self._ready.set()
            return False
        self._events.append(event)
        self._size += size
        self._ready.set()
        return True

    async def next(self, done: asyncio.Event) -> dict[str, Any] | None:
        """The next event; None once the subscriber is dropped, or when ``done`` is set and
        nothing is buffered."""
        while not self._events:
            if self.dropped.is_set() or done.is_set():
                return None
            self._ready.clear()
            ready = asyncio.ensure_future(self._ready.wait())
            finished = asyncio.ensure_future(done.wait())
            try:
                await asyncio.wait({ready, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                finished.cancel()
        if self.dropped.is_set():
            return None
        event = self._events.popleft()
        self._size -= event_size(event)
        return event
