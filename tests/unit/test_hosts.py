"""HostRegistry liveness (driven by explicit times) and HostSession request matching."""

from __future__ import annotations

import asyncio
import json

import pytest

from nbcluster.gateway import (
    HostRefused,
    HostRegistry,
    HostRequestError,
    HostSession,
    HostTimedOut,
    HostUnreachable,
)
from nbcluster.hostproto import (
    Hello,
    HostResources,
    Reply,
    StopReplica,
    decode_gateway_message,
)


def hello(name: str = "h1", cpus: int = 4) -> Hello:
    return Hello(name=name, address="10.0.0.1", resources=HostResources(cpus=cpus, memory_mb=1024))


class Wire:
    """The websocket side of a session: records frames the gateway sends."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.sent = asyncio.Event()

    async def send(self, frame: str) -> None:
        self.frames.append(frame)
        self.sent.set()


def session(name: str = "h1") -> HostSession:
    async def send(frame: str) -> None:
        pass

    return HostSession(name, send)


# -- registry ---------------------------------------------------------------------------------


def test_register_and_lookup() -> None:
    registry = HostRegistry(lost_timeout=5)
    s = session()
    entry = registry.register(hello(cpus=8), s, now=100.0)
    assert (entry.name, entry.state, entry.address) == ("h1", "connected", "10.0.0.1")
    assert entry.resources.cpus == 8
    assert (entry.last_seen, entry.connected_since) == (100.0, 100.0)
    assert registry.connected() == [entry]
    assert registry.session("h1") is s
    with pytest.raises(HostRequestError, match="host h2 is not connected"):
        registry.session("h2")


def test_duplicate_name_is_refused_while_connected() -> None:
    registry = HostRegistry(lost_timeout=5)
    first = session()
    registry.register(hello(), first, now=0.0)
    with pytest.raises(ValueError, match="a host named 'h1' is already connected"):
        registry.register(hello(), session(), now=1.0)
    assert registry.session("h1") is first
    assert not first.closed


@pytest.mark.parametrize("how", ["disconnected", "lost"])
def test_name_is_free_again_once_the_host_is_gone(how: str) -> None:
    registry = HostRegistry(lost_timeout=5)
    old = session()
    registry.register(hello(), old, now=0.0)
    if how == "disconnected":
        registry.disconnect("h1", old, now=1.0)
    else:
        assert [e.name for e in registry.find_lost(now=6.0)] == ["h1"]
    new = session()
    entry = registry.register(hello(cpus=2), new, now=7.0)
    assert entry.state == "connected"
    assert entry.resources.cpus == 2
    assert registry.session("h1") is new
    assert old.closed


def test_heartbeat_keeps_a_host_alive() -> None:
    registry = HostRegistry(lost_timeout=5)
    registry.register(hello("a"), session("a"), now=0.0)
    registry.register(hello("b"), session("b"), now=0.0)
    registry.heartbeat("a", now=4.0)
    registry.heartbeat("nobody", now=4.0)  # unknown names are ignored
    assert registry.find_lost(now=5.0) == []  # exactly at the timeout: not yet
    lost = registry.find_lost(now=5.5)
    assert [e.name for e in lost] == ["b"]
    assert registry.hosts["b"].state == "lost"
    assert registry.hosts["a"].state == "connected"
    assert [e.name for e in registry.connected()] == ["a"]
    assert registry.find_lost(now=5.6) == []  # each host is reported once
    assert [e.name for e in registry.find_lost(now=9.1)] == ["a"]


def test_lost_host_session_is_closed() -> None:
    registry = HostRegistry(lost_timeout=1)
    s = session()
    registry.register(hello(), s, now=0.0)
    [entry] = registry.find_lost(now=2.0)
    assert s.closed
    assert entry.session is None
    with pytest.raises(HostRequestError):
        registry.session("h1")


def test_disconnect_marks_the_host_and_closes_its_session() -> None:
    registry = HostRegistry(lost_timeout=5)
    s = session()
    registry.register(hello(), s, now=0.0)
    registry.disconnect("h1", s, now=1.0)
    entry = registry.hosts["h1"]
    assert entry.state == "disconnected"
    assert entry.session is None
    assert s.closed
    assert registry.connected() == []
    # heartbeats of a disconnected host do not revive it
    registry.heartbeat("h1", now=2.0)
    assert entry.last_seen == 0.0
    # and it becomes lost after the timeout since it was last seen
    assert registry.find_lost(now=4.0) == []
    assert registry.find_lost(now=5.5) == [entry]
    assert entry.state == "lost"


def test_stale_session_disconnect_does_not_affect_the_reconnected_host() -> None:
    registry = HostRegistry(lost_timeout=5)
    old = session()
    registry.register(hello(), old, now=0.0)
    registry.disconnect("h1", old, now=1.0)
    new = session()
    registry.register(hello(), new, now=2.0)
    registry.disconnect("h1", old, now=3.0)  # the old websocket handler finishing late
    entry = registry.hosts["h1"]
    assert entry.state == "connected"
    assert entry.session is new
    assert not new.closed
    registry.disconnect("nobody", old, now=3.0)  # unknown names are ignored
    assert registry.connected() == [entry]


# -- session ----------------------------------------------------------------------------------


async def _request_in_background(
    s: HostSession, wire: Wire, timeout: float = 5
) -> tuple[asyncio.Task[dict[str, object]], str]:
    task = asyncio.create_task(
        s.request(lambda rid: StopReplica(request_id=rid, replica_id="r1"), timeout)
    )
    await wire.sent.wait()
    wire.sent.clear()
    message = decode_gateway_message(wire.frames[-1])
    assert isinstance(message, StopReplica)
    return task, message.request_id


async def test_request_resolves_on_reply() -> None:
    wire = Wire()
    s = HostSession("h1", wire.send)
    task, request_id = await _request_in_background(s, wire)
    assert request_id.startswith("h1-")
    assert json.loads(wire.frames[0])["replica_id"] == "r1"
    s.on_reply(Reply(request_id="unrelated", ok=True, result={"x": 0}))
    assert not task.done()
    s.on_reply(Reply(request_id=request_id, ok=True, result={"pid": 7}))
    assert await task == {"pid": 7}
    s.on_reply(Reply(request_id=request_id, ok=True))  # a late duplicate is ignored


async def test_concurrent_requests_are_matched_by_id() -> None:
    wire = Wire()
    s = HostSession("h1", wire.send)
    first, first_id = await _request_in_background(s, wire)
    second, second_id = await _request_in_background(s, wire)
    assert first_id != second_id
    s.on_reply(Reply(request_id=second_id, ok=True, result={"n": 2}))
    s.on_reply(Reply(request_id=first_id, ok=True, result={"n": 1}))
    assert await first == {"n": 1}
    assert await second == {"n": 2}


async def test_error_reply_raises_with_the_hosts_text() -> None:
    wire = Wire()
    s = HostSession("h1", wire.send)
    task, request_id = await _request_in_background(s, wire)
    s.on_reply(Reply(request_id=request_id, ok=False, error="replica r1 is not running"))
    with pytest.raises(HostRefused, match=r"^replica r1 is not running$"):
        await task


async def test_close_fails_waiting_requests() -> None:
    wire = Wire()
    s = HostSession("h1", wire.send)
    task, _ = await _request_in_background(s, wire)
    s.close()
    with pytest.raises(HostUnreachable, match="host h1 disconnected"):
        await task
    with pytest.raises(HostUnreachable, match="host h1 is not connected"):
        await s.request(lambda rid: StopReplica(request_id=rid, replica_id="r1"), 1)
    assert len(wire.frames) == 1  # nothing sent after the close


async def test_request_times_out() -> None:
    wire = Wire()
    s = HostSession("h1", wire.send)
    with pytest.raises(HostTimedOut, match="host h1 did not answer within"):
        await s.request(lambda rid: StopReplica(request_id=rid, replica_id="r1"), 0.01)
    assert s._waiting == {}


async def test_send_failure_is_a_host_request_error() -> None:
    async def broken(frame: str) -> None:
        raise RuntimeError("Cannot call 'send' once a close message has been sent.")

    s = HostSession("h1", broken)
    with pytest.raises(HostRequestError, match="host h1"):
        await s.request(lambda rid: StopReplica(request_id=rid, replica_id="r1"), 1)
    assert s._waiting == {}
