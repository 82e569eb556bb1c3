"""The gateway's ZMQ connection to one kernel replica.

The gateway talks to replicas directly (no hop through the host daemon): DEALER sockets to the
replica's shell, control and stdin ROUTERs, a SUB socket to its IOPub and a REQ for heartbeats.
Shell and stdin share one identity, as in jupyter_client, so the replica's ``input_request``
reaches us. Sockets are read from the event loop's reader callbacks rather than one task per
socket: fewer wake-ups on the execute path. When the replica's connection names a CurveZMQ
server key, every socket (the heartbeat's too) is a CURVE client of it (``_curve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import zmq
import zmq.asyncio

from .._curve import apply_client_keys
from ..hostproto import ConnectionInfo
from ..protocol import Message, ProtocolError, Signer, decode_zmq, encode_zmq
from ._zmq_drain import drained

__all__ = ["ReplicaLink"]

log = logging.getLogger(__name__)

MessageHandler = Callable[["ReplicaLink", Message], None]
RejectHandler = Callable[["ReplicaLink", str, str], None]


class ReplicaLink:
    """Owned by a gateway kernel; :meth:`open` once, :meth:`send` per message, :meth:`close`."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        replica_id: str,
        connection: ConnectionInfo,
        signer: Signer,
        on_message: MessageHandler,
        on_reject: RejectHandler,
    ) -> None:
        self.replica_id = replica_id
        self.connection = connection
        self._context = context
        self._signer = signer
        self._on_message = on_message
        self._on_reject = on_reject
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.iopub_seen = asyncio.Event()
        self.closed = False

    def _url(self, port: int) -> str:
        c = self.connection
        return f"{c.transport}://{c.ip}:{port}" if c.transport == "tcp" else f"ipc://{c.ip}-{port}"

    def _secure(self, sock: zmq.Socket[bytes]) -> None:
        """Encrypt ``sock``'s traffic when the replica's sockets are CURVE servers."""
        if self.connection.curve_publickey is not None:
            apply_client_keys(sock, self.connection.curve_publickey)

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        identity = uuid.uuid4().hex.encode()
        c = self.connection
        for channel, kind, port in (
            ("shell", zmq.DEALER, c.shell_port),
            ("control", zmq.DEALER, c.control_port),
            ("stdin", zmq.DEALER, c.stdin_port),
            ("iopub", zmq.SUB, c.iopub_port),
        ):
            sock = self._context.socket(kind)
            sock.linger = 0
            if kind == zmq.DEALER and channel != "control":
                sock.identity = identity
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._secure(sock)
            sock.connect(self._url(port))
            self._sockets[channel] = sock
            self._loop.add_reader(int(sock.getsockopt(zmq.FD)), self._drain, channel)
        # Messages that arrived before the reader was registered leave no edge on the fd.
        for channel in self._sockets:
            self._loop.call_soon(self._drain, channel)

    def _drain(self, channel: str) -> None:
        sock = self._sockets.get(channel)
        if sock is None:
            return
        for frames in drained(sock, log, "replica %s %s", self.replica_id, channel):
            try:
                _, msg = decode_zmq(channel, frames, self._signer)
            except ProtocolError as exc:
                self._on_reject(self, channel, str(exc))
                continue
            if channel == "iopub":
                self.iopub_seen.set()
            try:
                self._on_message(self, msg)
            except Exception:
                log.exception(
                    "error handling a %s message from replica %s", channel, self.replica_id
                )

    def send(self, msg: Message) -> None:
        """Sign and send ``msg`` on its channel; never blocks the event loop."""
        sock = self._sockets.get(msg.channel)
        if sock is None:
            raise ConnectionError(f"replica {self.replica_id} link is closed")
        try:
            sock.send_multipart(encode_zmq(msg, self._signer), zmq.NOBLOCK)
        except zmq.Again:
            raise ConnectionError(
                f"replica {self.replica_id} is not accepting {msg.channel} messages"
            ) from None
        # A send can consume the fd's edge for pending input: look again soon.
        if self._loop is not None:
            self._loop.call_soon(self._drain, msg.channel)

    async def ping(self, timeout: float) -> bool:
        """Whether the replica answers a heartbeat within ``timeout`` seconds."""
        async_context = zmq.asyncio.Context.shadow(self._context)
        sock = async_context.socket(zmq.REQ)
        sock.linger = 0
        try:
            self._secure(sock)  # type: ignore[arg-type]  # an async socket is a zmq.Socket
            sock.connect(self._url(self.connection.hb_port))
            await sock.send(b"ping")
            return bool(await asyncio.wait_for(sock.recv(), timeout))
        except (TimeoutError, zmq.ZMQError):
            return False
        finally:
            sock.close()

    def close(self) -> None:
        self.closed = True
        loop = self._loop
        for sock in self._sockets.values():
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(Exception):
                    loop.remove_reader(int(sock.getsockopt(zmq.FD)))
            sock.close(linger=0)
        self._sockets.clear()
