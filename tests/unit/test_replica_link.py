"""ReplicaLink against a fake replica made of real ZMQ sockets on loopback: messages with a
valid signature are delivered, badly signed ones are rejected and the link keeps working."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import zmq

from nbcluster.gateway._replica import ReplicaLink
from nbcluster.hostproto import ConnectionInfo
from nbcluster.protocol import Message, Signer, encode_zmq, new_message


@dataclass
class FakeReplica:
    """The five sockets of a kernel, bound to random loopback ports."""

    context: zmq.Context[zmq.Socket[bytes]]
    sockets: dict[str, zmq.Socket[bytes]] = field(default_factory=dict)

    def bind(self) -> ConnectionInfo:
        ports = {}
        for name, kind in (
            ("shell", zmq.ROUTER),
            ("control", zmq.ROUTER),
            ("stdin", zmq.ROUTER),
            ("iopub", zmq.PUB),
            ("hb", zmq.REP),
        ):
            sock = self.context.socket(kind)
            sock.linger = 0
            ports[name] = sock.bind_to_random_port("tcp://127.0.0.1")
            self.sockets[name] = sock
        return ConnectionInfo(
            ip="127.0.0.1",
            shell_port=ports["shell"],
            control_port=ports["control"],
            stdin_port=ports["stdin"],
            iopub_port=ports["iopub"],
            hb_port=ports["hb"],
        )

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)


@dataclass
class Received:
    messages: list[Message] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)


KEY = b"the-kernel-key"


@pytest.fixture
async def setup() -> AsyncIterator[tuple[FakeReplica, ReplicaLink, Received]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    replica = FakeReplica(context)
    info = replica.bind()
    received = Received()

    def on_message(link: ReplicaLink, msg: Message) -> None:
        received.messages.append(msg)
        received.event.set()

    def on_reject(link: ReplicaLink, channel: str, reason: str) -> None:
        received.rejected.append(f"{channel}: {reason}")
        received.event.set()

    link = ReplicaLink(context, "r1", info, Signer(KEY), on_message, on_reject)
    link.open()
    yield replica, link, received
    link.close()
    replica.close()
    context.destroy(0)


async def _wait(received: Received, count: int) -> None:
    async with asyncio.timeout(10):
        while len(received.messages) + len(received.rejected) < count:
            received.event.clear()
            await received.event.wait()


def _recv_request(sock: zmq.Socket[bytes]) -> list[bytes]:
    assert sock.poll(10_000), "the fake replica got nothing"
    return sock.recv_multipart()


async def test_request_reaches_the_replica_signed_and_the_reply_comes_back(
    setup: tuple[FakeReplica, ReplicaLink, Received],
) -> None:
    replica, link, received = setup
    request = new_message("shell", "kernel_info_request", {})
    link.send(request)
    frames = await asyncio.to_thread(_recv_request, replica.sockets["shell"])
    identity, delimiter, signature, *parts = frames
    assert delimiter == b"<IDS|MSG>"
    assert Signer(KEY).verify(signature, parts[:4])
    reply = new_message("shell", "kernel_info_reply", {"status": "ok"}, parent=request)
    replica.sockets["shell"].send_multipart(encode_zmq(reply, Signer(KEY), [identity]))
    await _wait(received, 1)
    assert [m.msg_type for m in received.messages] == ["kernel_info_reply"]
    assert received.messages[0].parent_msg_id == request.msg_id
    assert received.rejected == []


async def test_badly_signed_replica_messages_are_rejected_and_the_link_keeps_working(
    setup: tuple[FakeReplica, ReplicaLink, Received],
) -> None:
    replica, link, received = setup
    # The SUB side connects asynchronously: publish until the first good message gets through.
    good = new_message("iopub", "status", {"execution_state": "idle"})
    async with asyncio.timeout(10):
        while not received.messages:
            replica.sockets["iopub"].send_multipart(encode_zmq(good, Signer(KEY)))
            await asyncio.sleep(0.02)
    before = len(received.messages)
    forged = new_message("iopub", "stream", {"name": "stdout", "text": "forged"})
    replica.sockets["iopub"].send_multipart(encode_zmq(forged, Signer(b"wrong-key")))
    after = new_message("iopub", "stream", {"name": "stdout", "text": "genuine"})
    replica.sockets["iopub"].send_multipart(encode_zmq(after, Signer(KEY)))
    async with asyncio.timeout(10):
        while not any(m.msg_id == after.msg_id for m in received.messages):
            received.event.clear()
            await received.event.wait()
    assert len(received.rejected) == 1
    assert "signature is invalid" in received.rejected[0]
    assert all(m.msg_id != forged.msg_id for m in received.messages[before:])
    assert link.iopub_seen.is_set()


async def test_ping_answers_while_the_replica_echoes_and_fails_when_it_does_not(
    setup: tuple[FakeReplica, ReplicaLink, Received],
) -> None:
    replica, link, _ = setup
    hb = replica.sockets["hb"]

    def echo_once() -> None:
        if hb.poll(10_000):
            hb.send(hb.recv())

    echo = asyncio.create_task(asyncio.to_thread(echo_once))
    assert await link.ping(timeout=10)
    await echo
    assert not await link.ping(timeout=0.3)


async def test_send_after_close_is_a_connection_error(
    setup: tuple[FakeReplica, ReplicaLink, Received],
) -> None:
    _, link, _ = setup
    link.close()
    with pytest.raises(ConnectionError, match="closed"):
        link.send(new_message("shell", "kernel_info_request", {}))
