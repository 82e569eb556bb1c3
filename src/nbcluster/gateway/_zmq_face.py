"""One kernel's ZMQ face: the five Jupyter sockets a stock ipykernel would bind (shell,
control and stdin ROUTERs, an IOPub XPUB, a heartbeat REP), opened by the gateway on behalf
of a replicated kernel so that any jupyter_client tool (``BlockingKernelClient``, ``jupyter
console --existing``, nbclient, an editor's "connect to existing kernel", the nbcluster
kernel provisioner) talks to it directly, without the websocket hop.

Each ZMQ client (one ROUTER identity: jupyter_client gives the shell, stdin and control
sockets of one client its session id) is a :class:`FaceClient`, attached to the kernel like a
websocket client, so the routing is the websocket path's (``GatewayKernel``): one reply per
request to the asker, input requests to the client whose cell asks, outputs of the executing
replica only. IOPub goes out once on the PUB socket to every subscriber (``PublishedOnce``).
Messages are signed with the face's own HMAC key (the kernel's key never leaves the gateway)
and, unless the gateway runs with ``--no-curve``, every socket is a CurveZMQ server with the
face's keypair. A message with a bad signature is dropped and counted
(``nbcluster_messages_rejected_total{source="zmq-client"}``).

Sockets are read from event-loop reader callbacks (edge-triggered drain), as ``ReplicaLink``
reads the replicas'.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from .._curve import public_key_of
from ..protocol import (
    KernelConnection,
    Message,
    ProtocolError,
    Signer,
    decode_zmq,
    encode_zmq,
    new_message,
)
from ._face_rules import PortRange, PublishedOnce, classify, is_ipv6
from ._kernel_protocols import ClientSink
from ._zmq_drain import drained

__all__ = [
    "FaceClient",
    "FaceKernel",
    "FaceKeys",
    "FacePortsExhausted",
    "KernelControl",
    "ZmqFace",
]

log = logging.getLogger(__name__)

#: The five channels and the socket each binds, as ipykernel binds them.
_SOCKET_KINDS = {
    "shell": zmq.ROUTER,
    "iopub": zmq.XPUB,
    "stdin": zmq.ROUTER,
    "control": zmq.ROUTER,
    "hb": zmq.REP,
}
#: Milliseconds a closing socket keeps trying to deliver what it queued (the last replies of a
#: shut-down kernel).
_LINGER_MS = 500


class FacePortsExhausted(RuntimeError):
    """No free port left in the configured range for a face's socket."""


class FaceKernel(Protocol):
    """What a face needs of its kernel (``GatewayKernel``)."""

    @property
    def id(self) -> str: ...

    @property
    def is_dead(self) -> bool: ...

    def attach(self, client: ClientSink) -> None: ...

    def detach(self, client: ClientSink) -> None: ...

    def handle_client_message(self, client: ClientSink, msg: Message) -> None: ...


class KernelControl(Protocol):
    """Carries out the requests a face answers itself (the gateway's ``KernelManager``)."""

    async def interrupt_kernel(self, kernel_id: str) -> None: ...

    async def shutdown_kernel(self, kernel_id: str) -> None: ...


Spawn = Callable[[str, Coroutine[Any, Any, Any]], object]


@dataclass(frozen=True, slots=True)
class FaceKeys:
    """A face's secrets: its HMAC key and, when encrypted, its CurveZMQ server secret key
    (Z85; the public key follows from it)."""

    key: str
    curve_secret: str | None = None


class FaceClient:
    """One ZMQ client of a face, attached to the kernel as a ``ClientSink``: what the kernel
    sends it goes out on the channel's socket to its identity (IOPub: published once)."""

    __slots__ = ("_face", "identity")

    def __init__(self, face: ZmqFace, identity: bytes) -> None:
        self._face = face
        self.identity = identity

    def send(self, msg: Message) -> None:
        self._face.deliver(msg, self.identity)

    def close(self, code: int = 1000, reason: str = "") -> None:
        # The kernel closes its clients when it is shut down (or the gateway stops).
        self._face.kernel_closed(reason)


class _Publisher:
    """Attached for the face's life so that IOPub reaches subscribers that never sent a
    request (a client that only watches)."""

    __slots__ = ("_face",)

    def __init__(self, face: ZmqFace) -> None:
        self._face = face

    def send(self, msg: Message) -> None:
        if msg.channel == "iopub":
            self._face.deliver(msg, None)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._face.kernel_closed(reason)


class ZmqFace:
    """Made and owned by the gateway's ``ZmqFaces``: :meth:`open` once, then it serves
    until :meth:`close` (the kernel shut down, the face was revoked, the gateway stops)."""

    def __init__(
        self,
        kernel: FaceKernel,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        bind_ip: str,
        advertised_ip: str,
        port_range: PortRange | None,
        keys: FaceKeys,
        kernel_name: str,
        control: KernelControl,
        spawn: Spawn,
        on_reject: Callable[[str, str], None],
        on_closed: Callable[[ZmqFace], None],
        client_limit: int = 256,
    ) -> None:
        self.kernel = kernel
        self._context = context
        self._bind_ip = bind_ip
        self._advertised_ip = advertised_ip
        self._range = port_range
        self._keys = keys
        self._kernel_name = kernel_name
        self._control = control
        self._spawn = spawn
        self._on_reject = on_reject
        self._on_closed = on_closed
        self._client_limit = client_limit
        self._signer = Signer(keys.key.encode())
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._clients: OrderedDict[bytes, FaceClient] = OrderedDict()
        self._publisher = _Publisher(self)
        self._published = PublishedOnce()
        self._topic_prefix = f"kernel.{kernel.id}.".encode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connection: KernelConnection | None = None
        self.closed = False

    # -- opening ------------------------------------------------------------------------------

    def open(self, ports_of: Mapping[str, int] | None = None) -> KernelConnection:
        """Bind the five sockets and start serving; returns the connection info. Raises
        :class:`FacePortsExhausted` when the port range has no room (nothing stays bound).
        ``ports_of`` (channel → port): bind exactly those, as the face had before a gateway
        restart; raises ``zmq.ZMQError`` when one is taken."""
        self._loop = asyncio.get_running_loop()
        ports: dict[str, int] = {}
        try:
            for channel, kind in _SOCKET_KINDS.items():
                sock = self._context.socket(kind)
                self._sockets[channel] = sock
                sock.linger = _LINGER_MS
                if kind == zmq.ROUTER:
                    # A client that reconnects with its session id takes its identity back.
                    sock.router_handover = 1
                if kind == zmq.XPUB:
                    # Every subscription reaches us, for the iopub_welcome (JEP 65).
                    sock.xpub_verbose = 1
                if self._keys.curve_secret is not None:
                    sock.curve_secretkey = self._keys.curve_secret.encode("ascii")
                    sock.curve_publickey = public_key_of(self._keys.curve_secret).encode("ascii")
                    sock.curve_server = True
                if ports_of is None:
                    ports[channel] = self._bind(sock, set(ports.values()))
                else:
                    ports[channel] = self._bind_exactly(sock, ports_of[channel])
        except BaseException:
            self._close_sockets(linger=0)
            raise
        for channel, sock in self._sockets.items():
            self._loop.add_reader(int(sock.getsockopt(zmq.FD)), self._drain, channel)
            self._loop.call_soon(self._drain, channel)
        self.kernel.attach(self._publisher)
        curve = self._keys.curve_secret
        self.connection = KernelConnection(
            ip=self._advertised_ip,
            shell_port=ports["shell"],
            iopub_port=ports["iopub"],
            stdin_port=ports["stdin"],
            control_port=ports["control"],
            hb_port=ports["hb"],
            key=self._keys.key,
            kernel_name=self._kernel_name,
            curve_publickey=None if curve is None else public_key_of(curve),
            curve_secretkey=curve,
        )
        log.info(
            "kernel %s: ZMQ face on %s ports %s%s",
            self.kernel.id,
            self._bind_ip,
            ",".join(str(p) for p in self.connection.ports),
            " (CurveZMQ)" if curve else "",
        )
        return self.connection

    def _endpoint_ip(self, sock: zmq.Socket[bytes]) -> str:
        ip = self._bind_ip
        if is_ipv6(ip):
            sock.ipv6 = True
            ip = f"[{ip}]"
        return ip

    def _bind_exactly(self, sock: zmq.Socket[bytes], port: int) -> int:
        sock.bind(f"tcp://{self._endpoint_ip(sock)}:{port}")
        return port

    def _bind(self, sock: zmq.Socket[bytes], taken: set[int]) -> int:
        ip = self._endpoint_ip(sock)
        if self._range is None:
            sock.bind(f"tcp://{ip}:*")
            endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(endpoint, bytes)
            return int(endpoint.decode().rsplit(":", 1)[1])
        for port in self._range.candidates():
            if port in taken:
                continue
            try:
                sock.bind(f"tcp://{ip}:{port}")
            except zmq.ZMQError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return port
        raise FacePortsExhausted(
            f"no free port left in the ZMQ port range {self._range} ({self._range.size} "
            f"ports; each kernel's face takes 5): close faces of other kernels or widen "
            "--port-range"
        )

    # -- from ZMQ clients ---------------------------------------------------------------------

    def _drain(self, channel: str) -> None:
        sock = self._sockets.get(channel)
        if sock is None:
            return
        for frames in drained(sock, log, "kernel %s face %s", self.kernel.id, channel):
            try:
                if channel == "hb":
                    self._heartbeat(sock, frames)
                elif channel == "iopub":
                    self._subscription(frames)
                else:
                    self._from_client(channel, frames)
            except Exception:
                log.exception("kernel %s: error handling a %s message", self.kernel.id, channel)

    def _heartbeat(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        # A REP socket must answer before it can read again; a dead kernel answers nothing
        # more after this (closing and reopening the socket would change its port).
        if self.kernel.is_dead:
            return
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(frames, zmq.NOBLOCK)

    def _subscription(self, frames: list[bytes]) -> None:
        for frame in frames:
            if frame[:1] == b"\x01":
                try:
                    topic = frame[1:].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                welcome = new_message("iopub", "iopub_welcome", {"subscription": topic})
                self._publish(welcome)

    def _from_client(self, channel: str, frames: list[bytes]) -> None:
        try:
            identities, msg = decode_zmq(channel, frames, self._signer, check_body=True)
        except ProtocolError as exc:
            self._on_reject("zmq-client", str(exc))
            log.warning("kernel %s: rejected a %s message: %s", self.kernel.id, channel, exc)
            return
        if not identities:
            return  # a ROUTER always prepends one: nothing else can be answered
        client = self._client(identities[0])
        action = classify(msg)
        if action == "forward":
            self.kernel.handle_client_message(client, msg)
        elif action == "interrupt":
            if channel != "shell":
                # A client sends the cell on shell, then the interrupt on control: the two
                # sockets are read apart, so a cell already here is routed first (else the
                # interrupt would find nothing to interrupt and the cell run on).
                self._drain("shell")
            self._spawn("face interrupt", self._interrupt(client, msg))
        else:
            restart = action == "restart_ack"
            client.send(
                new_message(
                    msg.channel,
                    "shutdown_reply",
                    {"status": "ok", "restart": restart},
                    parent=msg.header,
                )
            )
            if not restart:
                self._spawn("face shutdown", self._control.shutdown_kernel(self.kernel.id))

    def _client(self, identity: bytes) -> FaceClient:
        client = self._clients.get(identity)
        if client is not None:
            self._clients.move_to_end(identity)
            return client
        client = FaceClient(self, identity)
        self._clients[identity] = client
        self.kernel.attach(client)
        while len(self._clients) > self._client_limit:
            # The client heard from least recently: its open requests are forgotten.
            _, oldest = self._clients.popitem(last=False)
            self.kernel.detach(oldest)
        return client

    async def _interrupt(self, client: FaceClient, msg: Message) -> None:
        content: dict[str, Any] = {"status": "ok"}
        try:
            await self._control.interrupt_kernel(self.kernel.id)
        except Exception as exc:  # the client gets the reason instead of waiting
            content = {
                "status": "error",
                "ename": type(exc).__name__,
                "evalue": str(exc),
                "traceback": [],
            }
        client.send(new_message("control", "interrupt_reply", content, parent=msg.header))

    # -- to ZMQ clients -----------------------------------------------------------------------

    def deliver(self, msg: Message, identity: bytes | None) -> None:
        """Send ``msg`` from the kernel: IOPub to every subscriber (once), a reply on its
        channel to the client ``identity``."""
        if msg.channel == "iopub":
            if self._published.first(msg.msg_id):
                self._publish(msg)
            return
        sock = self._sockets.get(msg.channel)
        if sock is None or identity is None:
            return
        try:
            sock.send_multipart(encode_zmq(msg, self._signer, (identity,)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # full or gone: as a ROUTER drops what it cannot route
            log.debug("kernel %s: %s to a client dropped: %s", self.kernel.id, msg.msg_type, exc)
        self._poke(msg.channel)

    def _publish(self, msg: Message) -> None:
        sock = self._sockets.get("iopub")
        if sock is None:
            return
        topic = self._topic_prefix + msg.msg_type.encode()
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(encode_zmq(msg, self._signer, (topic,)), zmq.NOBLOCK)
        self._poke("iopub")

    def _poke(self, channel: str) -> None:
        # A send can consume the fd's edge for pending input: look again soon.
        if self._loop is not None and not self.closed:
            self._loop.call_soon(self._drain, channel)

    # -- closing ------------------------------------------------------------------------------

    def kernel_closed(self, reason: str) -> None:
        """The kernel closed its clients (shut down, or the gateway stops): so does the face."""
        if not self.closed:
            log.info("kernel %s: ZMQ face closes (%s)", self.kernel.id, reason or "closed")
            self.close()

    def close(self) -> None:
        """Detach from the kernel and close the sockets (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.kernel.detach(self._publisher)
        for client in self._clients.values():
            self.kernel.detach(client)
        self._clients.clear()
        self._close_sockets(linger=_LINGER_MS)
        self._on_closed(self)

    def _close_sockets(self, linger: int) -> None:
        loop = self._loop
        for sock in self._sockets.values():
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(Exception):
                    loop.remove_reader(int(sock.getsockopt(zmq.FD)))
            sock.close(linger=linger)
        self._sockets.clear()
