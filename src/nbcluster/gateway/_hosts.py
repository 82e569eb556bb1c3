"""Host daemons known to the gateway: their sessions, resources and liveness.

A host is ``connected`` while its websocket is open and it heartbeats, ``disconnected`` from
the moment its websocket closes, and ``lost`` once it has been silent for
``host_lost_timeout``: then its replicas are declared dead. Liveness decisions take the time as
an argument so that tests drive them without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from ..hostproto import MAX_FRAME_BYTES, Hello, HostResources, Reply, encode
from ._errors import (
    HostMessageTooLarge,
    HostRefused,
    HostRequestError,
    HostTimedOut,
    HostUnreachable,
)

__all__ = [
    "HostEntry",
    "HostMessageTooLarge",
    "HostRefused",
    "HostRegistry",
    "HostRequestError",
    "HostSession",
    "HostTimedOut",
    "HostUnreachable",
]

log = logging.getLogger(__name__)

HostState = Literal["connected", "disconnected", "lost"]

SendFrame = Callable[[str], Any]


class HostSession:
    """The open websocket to one host: sends requests and matches replies to them."""

    _ids = itertools.count(1)

    def __init__(
        self, name: str, send_frame: Callable[[str], Any], max_frame: int = MAX_FRAME_BYTES
    ) -> None:
        self.name = name
        self._send_frame = send_frame
        #: The host's websocket message cap: a larger request is refused, never sent.
        self.max_frame = max_frame
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self.closed = False

    async def request(self, build: Callable[[str], BaseModel], timeout: float) -> dict[str, Any]:
        """Send the request ``build(request_id)`` and return the host's result. Raises
        :class:`HostUnreachable` (not connected, or it went away), :class:`HostTimedOut` or
        :class:`HostRefused` (it answered with an error); :class:`HostMessageTooLarge`
        (never sent) when the request would be over the host's message cap."""
        if self.closed:
            raise HostUnreachable(f"host {self.name} is not connected")
        request_id = f"{self.name}-{next(self._ids)}"
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        message = build(request_id)
        frame = encode(message)
        size = _frame_size(frame, self.max_frame)
        if size > self.max_frame:
            raise HostMessageTooLarge(
                f"the {getattr(message, 'type', type(message).__name__)} request for host "
                f"{self.name} would be {size} bytes, over the hosts' message limit of "
                f"{self.max_frame} bytes; it was not sent"
            )
        self._waiting[request_id] = future
        try:
            try:
                await self._send_frame(frame)
            except Exception as exc:  # the websocket closed under us
                raise HostUnreachable(f"host {self.name}: cannot send the request: {exc}") from exc
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise HostTimedOut(f"host {self.name} did not answer within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)
        if not reply.ok:
            raise HostRefused(reply.error)
        return reply.result

    def on_reply(self, reply: Reply) -> None:
        future = self._waiting.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)

    def close(self) -> None:
        self.closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(HostUnreachable(f"host {self.name} disconnected"))


def _frame_size(frame: str, limit: int) -> int:
    """The UTF-8 size of ``frame``, computed only when its length leaves it in doubt."""
    if len(frame) > limit or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode())


@dataclass
class HostEntry:
    name: str
    address: str
    resources: HostResources
    state: HostState
    last_seen: float
    connected_since: float
    session: HostSession | None = field(default=None, repr=False)


class HostRegistry:
    """Registered hosts by name. The host endpoint feeds it; placement and the API read it."""

    def __init__(self, lost_timeout: float) -> None:
        self.lost_timeout = lost_timeout
        self.hosts: dict[str, HostEntry] = {}

    def register(self, hello: Hello, session: HostSession, now: float) -> HostEntry:
        """Accept a hello. Raises ``ValueError`` if a live host already has that name."""
        existing = self.hosts.get(hello.name)
        if existing is not None and existing.state == "connected":
            raise ValueError(f"a host named {hello.name!r} is already connected")
        entry = HostEntry(
            name=hello.name,
            address=hello.address,
            resources=hello.resources,
            state="connected",
            last_seen=now,
            connected_since=now,
            session=session,
        )
        self.hosts[hello.name] = entry
        return entry

    def heartbeat(self, name: str, now: float) -> None:
        entry = self.hosts.get(name)
        if entry is not None and entry.state == "connected":
            entry.last_seen = now

    def disconnect(self, name: str, session: HostSession, now: float) -> None:
        entry = self.hosts.get(name)
        if entry is None or entry.session is not session:
            return  # an older session of a host that already reconnected
        session.close()
        entry.session = None
        entry.state = "disconnected"

    def find_lost(self, now: float) -> list[HostEntry]:
        """Hosts silent for longer than the timeout, now marked lost (each reported once)."""
        lost = []
        for entry in self.hosts.values():
            if entry.state != "lost" and now - entry.last_seen > self.lost_timeout:
                entry.state = "lost"
                if entry.session is not None:
                    entry.session.close()
                    entry.session = None
                lost.append(entry)
        return lost

    def forget(self, name: str) -> None:
        """Drop a host that was stopped on purpose (scaled in): it is not lost, it is gone."""
        entry = self.hosts.pop(name, None)
        if entry is not None and entry.session is not None:
            entry.session.close()
            entry.session = None

    def connected(self) -> list[HostEntry]:
        return [h for h in self.hosts.values() if h.state == "connected"]

    def session(self, name: str) -> HostSession:
        entry = self.hosts.get(name)
        if entry is None or entry.session is None:
            raise HostUnreachable(f"host {name} is not connected")
        return entry.session
