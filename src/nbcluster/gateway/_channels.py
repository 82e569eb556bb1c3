"""The kernel channels websocket (``/api/kernels/{id}/channels``): one client connection.

Frames are decoded with the framing the client chose (legacy JSON, or the v1 binary
subprotocol) and handed to the kernel; what the kernel sends the client is queued and written
by one writer task per connection, so that a slow client never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..protocol import (
    V1_SUBPROTOCOL,
    Message,
    ProtocolError,
    decode_legacy,
    decode_v1,
    encode_legacy,
    encode_v1,
)
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics

__all__ = ["ClientConnection", "serve_channels"]

log = logging.getLogger(__name__)


class ClientConnection:
    """Sends to one websocket client; created and driven by :func:`serve_channels`."""

    def __init__(self, websocket: WebSocket, v1: bool, queue_limit: int) -> None:
        self._ws = websocket
        self._v1 = v1
        self._limit = queue_limit
        self._queue: deque[str | bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing: tuple[int, str] | None = None

    def send(self, msg: Message) -> None:
        if self._closing is not None:
            return
        frame = encode_v1(msg) if self._v1 else encode_legacy(msg)
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._queued_bytes > self._limit:
            log.warning("client too slow (%d bytes queued); disconnecting it", self._queued_bytes)
            self._queue.clear()
            self.close(1008, "client too slow: output queue overflowed")
        self._wakeup.set()

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closing is None:
            self._closing = (code, reason)
        self._wakeup.set()

    async def write_loop(self) -> None:
        ws = self._ws
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                frame = self._queue.popleft()
                self._queued_bytes -= len(frame)
                if isinstance(frame, str):
                    await ws.send_text(frame)
                else:
                    await ws.send_bytes(frame)
            if self._closing is not None:
                with contextlib.suppress(RuntimeError):
                    await ws.close(*self._closing)
                return


async def serve_channels(
    websocket: WebSocket, kernel: GatewayKernel, metrics: GatewayMetrics, queue_limit: int
) -> None:
    """Run one channels connection until either side closes it."""
    offered = websocket.scope.get("subprotocols") or []
    v1 = V1_SUBPROTOCOL in offered
    await websocket.accept(subprotocol=V1_SUBPROTOCOL if v1 else None)
    client = ClientConnection(websocket, v1, queue_limit)
    writer = asyncio.create_task(client.write_loop())
    kernel.attach(client)
    try:
        while not writer.done():
            event = await websocket.receive()
            if event["type"] == "websocket.disconnect":
                break
            data = event.get("bytes")
            frame: str | bytes | None = data if data is not None else event.get("text")
            if frame is None:
                continue
            try:
                msg = decode_v1(frame) if v1 else decode_legacy(frame, default_channel="shell")
            except ProtocolError as exc:
                metrics.reject("client", str(exc))
                log.warning("rejected a frame from a client of kernel %s: %s", kernel.id, exc)
                continue
            kernel.handle_client_message(client, msg)
    except WebSocketDisconnect:
        pass
    finally:
        kernel.detach(client)
        client.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, 2.0)
        writer.cancel()
