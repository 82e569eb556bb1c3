"""The Raft port's transport: pysyncobj's TCP transport with bounds on what a peer may send
before and after it has proved it knows the group's password (``docs/security.md``,
"Encrypted transport").

pysyncobj 0.3.17 frames every message as a 4-byte length and a Fernet token (encrypted and
authenticated with a key derived from the password); this port seals frames with AES-GCM
instead (``_frame_cipher``: a tenth of Fernet's CPU), keeping pysyncobj's framing and its
per-connection handshake. It reads a frame whole before it checks
anything, with a buffer grown by concatenation: a peer that knows nothing could make a
replica buffer up to 2 GiB (a 48 MB frame cost 17.7 s of CPU, the copies being quadratic).
Here a connection is *authenticated* once it has delivered a frame that decrypts and carries
the random key this end chose for the connection (pysyncobj's per-connection handshake:
only a holder of the password can produce it, and a replayed frame cannot, as the key is
new). Until then:

* a frame may declare at most :data:`PREAUTH_FRAME_BYTES`; a larger declared length closes
  the connection as soon as its 4-byte header arrives, before any of the frame is buffered;
* a frame that does not decrypt closes the connection (as pysyncobj did, after buffering it);
* an incoming connection has :data:`AUTH_TIMEOUT` seconds to authenticate, and at most
  :data:`MAX_PENDING` unauthenticated incoming connections are kept (the oldest goes first):
  a peer's real handshake takes one round trip.

An authenticated peer holds the password, as the kernel's own replicas do; its frames are
still capped at :data:`MAX_FRAME_BYTES`. That cap is high on purpose: a follower forwards a
proposed record to the leader whole, in one frame (pysyncobj's ``apply_command``), and a
record holds a cell's state change, whose values are each under the store threshold but
not bounded together.

pysyncobj sends on a new connection before the handshake is done (it checks only that the
socket is connected), so a real peer's first frames can fail the key check; pysyncobj closed
such a connection silently and reconnected, as it still does (frames that decrypt are from a
password holder: they are not counted or logged as refused).

Buffers are ``bytearray``s consumed from the front, so a frame costs time linear in its
size. Everything here runs in the node's tick thread.

**Frames are compressed only when large.** pysyncobj zlib-compresses every message. On the
2-core test machine ``zlib.compress`` of a message of a few hundred bytes took 55 to 75 us
(setting up the compressor dominates), a cell sends some twenty such messages across its
replicas, and the replicas are CPU-bound there (``docs/provisioner.md``, "Figures"). Here a
message whose pickle is under :data:`COMPRESS_ABOVE` bytes goes uncompressed, marked by a
leading :data:`_RAW` byte (a zlib stream never starts with it: its first byte names the
deflate method, low nibble 8); larger ones are compressed as before, which pays on a slow
link. Both ends must run this code: replicas of one kernel run one nbcluster version
(``docs/consensus.md``).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
import zlib
from typing import Any, Final

import pysyncobj
import pysyncobj.pickle
import pysyncobj.tcp_connection
import pysyncobj.transport

from ._frame_cipher import FrameCipher

__all__ = [
    "AUTH_TIMEOUT",
    "MAX_FRAME_BYTES",
    "MAX_PENDING",
    "PREAUTH_FRAME_BYTES",
    "GuardedTransport",
]

log = logging.getLogger(__name__)

_TcpConnection: Any = pysyncobj.tcp_connection.TcpConnection
_TCPTransport: Any = pysyncobj.transport.TCPTransport
_DISCONNECTED: Final = pysyncobj.tcp_connection.CONNECTION_STATE.DISCONNECTED
_loads: Any = pysyncobj.pickle.loads

#: pysyncobj's frame header: the length of the token that follows (native int, as it packs).
_HEADER: Final = struct.Struct("i")
#: Largest frame before authentication: the handshake's frames are a few hundred bytes.
PREAUTH_FRAME_BYTES: Final = 16 * 2**10
#: Largest frame from an authenticated peer (pysyncobj's own bound is 2 GiB; records of a
#: few MB already take pysyncobj seconds, which is why large values go to the object store).
MAX_FRAME_BYTES: Final = 256 * 2**20
#: Seconds an incoming connection has to authenticate.
AUTH_TIMEOUT: Final = 5.0
#: Unauthenticated incoming connections kept at once; a new one past it closes the oldest.
MAX_PENDING: Final = 32
#: Messages whose pickle is at least this long are zlib-compressed (module docstring).
COMPRESS_ABOVE: Final = 64 * 2**10
#: The first byte of an uncompressed message (never the first byte of a zlib stream).
_RAW: Final = b"\x00"
_dumps: Any = pysyncobj.pickle.dumps
#: At most one log line per this many seconds about refused peers (the rest are counted).
_LOG_EVERY = 10.0


class _GuardedConnection(_TcpConnection):  # type: ignore[misc]  # untyped base
    """pysyncobj's ``TcpConnection`` with the bounds above. Connections are made by pysyncobj
    (its server accepts them, its transport creates outgoing ones) and adopted with
    :func:`_guard`, which sets the attributes below; the overrides replace its private
    (name-mangled) read and parse methods."""

    authenticated: bool
    opened_at: float
    transport: GuardedTransport
    # pysyncobj's, set in its __init__ (annotated here for the type checker only)
    _TcpConnection__readBuffer: bytes | bytearray
    recvLastTimestamp: int

    def connect(self, host: str, port: int) -> bool:
        self.authenticated = False
        self.opened_at = time.monotonic()
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        self.authenticated = False
        super().disconnect()

    def send(self, message: Any) -> None:
        """pysyncobj's ``send``, with small messages left uncompressed and the frame sealed
        by the transport's cipher (module docstring)."""
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = _encode(message)
        cipher = self.transport.cipher
        if cipher is not None:
            data = cipher.seal(data, int(time.monotonic()))
        self._TcpConnection__writeBuffer += _HEADER.pack(len(data)) + data
        self._TcpConnection__trySendBuffer()

    def _frame_limit(self) -> int:
        if self.authenticated or self.transport.cipher is None:
            return MAX_FRAME_BYTES
        return PREAUTH_FRAME_BYTES

    def _buffer(self) -> bytearray:
        buffer = self._TcpConnection__readBuffer
        if not isinstance(buffer, bytearray):  # pysyncobj resets it to bytes()
            buffer = bytearray(buffer)
            self._TcpConnection__readBuffer = buffer
        return buffer

    def _refuse(self, why: str) -> None:
        try:
            peer = self._TcpConnection__socket.getpeername()
        except (OSError, AttributeError):
            peer = "?"
        self.transport.refused(peer, why)
        self.disconnect()

    def _header_ok(self, buffer: bytearray) -> bool:
        """Whether the frame at the front of ``buffer`` may be read (False: refused)."""
        if len(buffer) < _HEADER.size:
            return True
        (length,) = _HEADER.unpack_from(buffer)
        limit = self._frame_limit()
        if 0 < length <= limit:
            return True
        stage = "an authenticated" if self.authenticated else "an unauthenticated"
        self._refuse(f"{stage} peer declared a {length}-byte frame (limit {limit})")
        return False

    def _TcpConnection__processRead(self) -> bool:
        buffer = self._buffer()
        if len(buffer) >= _HEADER.size + self._frame_limit():
            return False  # a whole frame is waiting: parse it before reading more
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return False
        buffer += incoming
        return self._header_ok(buffer)

    def _TcpConnection__processParseMessage(self) -> Any:
        buffer = self._buffer()
        if len(buffer) < _HEADER.size or not self._header_ok(buffer):
            return None
        (length,) = _HEADER.unpack_from(buffer)
        end = _HEADER.size + length
        if len(buffer) < end:
            return None
        data = bytes(buffer[_HEADER.size : end])
        keyed = self.recvRandKey is not None
        cipher = self.transport.cipher
        try:
            if cipher is not None:
                timestamp = cipher.timestamp(data)
                if timestamp < self.recvLastTimestamp:
                    raise ValueError("a frame older than the previous one")
                data = cipher.open(data)
                self.recvLastTimestamp = timestamp
        except Exception:
            stage = "an authenticated" if self.authenticated else "an unauthenticated"
            self._refuse(f"{stage} peer sent a frame that is not the group's")
            return None
        try:
            # Decrypted: the sender knows the password. Not for this connection: pysyncobj's
            # send-before-handshake race (module docstring), or a replay; closed quietly.
            message = _decode(data)
            if keyed:
                key, message = message
                if key != self.recvRandKey:
                    raise ValueError("a frame for another connection")
        except Exception as exc:
            log.debug("Raft port: closed a connection on a frame not for it (%s)", exc)
            self.disconnect()
            return None
        del buffer[:end]
        if keyed and not self.authenticated:
            self.authenticated = True
        return message


def _encode(message: Any) -> bytes:
    """A message as a frame's plaintext: its pickle, compressed if large."""
    raw: bytes = _dumps(message)
    if len(raw) < COMPRESS_ABOVE:
        return _RAW + raw
    return zlib.compress(raw, 3)


def _decode(data: bytes) -> Any:
    """The message in a frame's plaintext (raises on anything else)."""
    if data[:1] == _RAW:
        return _loads(data[1:])
    return _loads(zlib.decompress(data))


def _guard(conn: Any, transport: GuardedTransport) -> None:
    """Make pysyncobj's connection ``conn`` a :class:`_GuardedConnection` (no state of its
    own beyond the attributes set here; the subclass only replaces methods)."""
    conn.__class__ = _GuardedConnection
    conn.authenticated = False
    conn.opened_at = time.monotonic()
    conn.transport = transport


class GuardedTransport(_TCPTransport):  # type: ignore[misc]  # untyped base
    """pysyncobj's ``TCPTransport`` whose connections are :class:`_GuardedConnection`\\ s,
    with the limits on unauthenticated incoming connections. Pass it to ``SyncObj`` as
    ``transportClass``."""

    def __init__(self, sync_obj: Any, *args: Any, **kwargs: Any) -> None:
        #: Seals every frame of this node's connections (None: the group has no password).
        password = sync_obj.conf.password
        self.cipher = FrameCipher.from_password(password) if password else None
        #: Connections closed for what they sent or for not authenticating in time.
        self.refused_count = 0
        self._last_logged = 0.0
        self._unlogged = 0
        super().__init__(sync_obj, *args, **kwargs)

    def refused(self, peer: object, why: str) -> None:
        self.refused_count += 1
        now = time.monotonic()
        if now - self._last_logged < _LOG_EVERY:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning("Raft port: closed a connection from %s: %s%s", peer, why, more)
        self._last_logged, self._unlogged = now, 0

    def _onNewIncomingConnection(self, conn: Any) -> None:
        _guard(conn, self)
        pending = sorted(self._unknownConnections, key=lambda c: c.opened_at)
        for old in pending[: max(0, len(pending) - MAX_PENDING + 1)]:
            old._refuse(f"too many unauthenticated connections (limit {MAX_PENDING})")
        super()._onNewIncomingConnection(conn)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, _GuardedConnection):
            _guard(conn, self)

    def _onTick(self) -> None:
        super()._onTick()
        if not self._unknownConnections:
            return
        deadline = time.monotonic() - AUTH_TIMEOUT
        for conn in list(self._unknownConnections):
            if conn.opened_at < deadline and conn.state != _DISCONNECTED:
                conn._refuse(f"no authentication within {AUTH_TIMEOUT:g} s")
