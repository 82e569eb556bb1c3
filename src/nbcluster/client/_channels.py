"""A websocket client for one kernel's channels, speaking either framing.

It keeps the messages a request produced together (by parent message id) so that callers can
run a cell and collect its outputs and reply, as jupyter_client's ``execute_interactive`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..protocol import (
    KERNEL_CHANNELS,
    V1_SUBPROTOCOL,
    Message,
    decode_legacy,
    decode_v1,
    encode_legacy,
    encode_v1,
    new_message,
)

__all__ = ["ExecutionResult", "KernelChannels"]


@dataclass
class ExecutionResult:
    """What one cell produced: the reply's content and the IOPub messages, in order."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.reply.get("status"))

    def stream_text(self, name: str = "stdout") -> str:
        return "".join(
            o["content"]["text"]
            for o in self.outputs
            if o["msg_type"] == "stream" and o["content"].get("name") == name
        )

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [o for o in self.outputs if o["msg_type"] == msg_type]


class KernelChannels:
    """``ssl`` verifies a wss gateway (default: the system's trust store); pass
    :attr:`GatewayClient.ssl` to verify it as the REST client does."""

    def __init__(
        self,
        url: str,
        token: str,
        kernel_id: str,
        *,
        v1: bool = False,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        base = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self._ssl = ssl if base.startswith("wss://") else None
        self._url = f"{base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        self._token = token
        self.v1 = v1
        self.session = uuid.uuid4().hex
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._by_parent: dict[str, asyncio.Queue[dict[str, Any]]] = defaultdict(asyncio.Queue)
        self.unrouted: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def __aenter__(self) -> KernelChannels:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        self._ws = await connect(
            self._url,
            additional_headers={"Authorization": f"token {self._token}"},
            subprotocols=[V1_SUBPROTOCOL] if self.v1 else None,  # type: ignore[list-item]
            max_size=None,
            compression=None,
            ssl=self._ssl,
        )
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                msg = (
                    decode_v1(frame, KERNEL_CHANNELS)
                    if self.v1
                    else decode_legacy(frame, KERNEL_CHANNELS)
                )
                as_dict = msg.to_dict()
                parent = msg.parent_msg_id
                if parent is not None and parent in self._by_parent:
                    self._by_parent[parent].put_nowait(as_dict)
                else:
                    self.unrouted.put_nowait(as_dict)
        except ConnectionClosed:
            pass  # the server went away without a closing handshake: ``closed`` tells
        finally:
            self.closed.set()

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as is (tests use it to send malformed frames)."""
        assert self._ws is not None
        await self._ws.send(frame)

    async def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
        parent: dict[str, Any] | None = None,
    ) -> str:
        """Send a message; returns its id. Replies are collected under that id."""
        msg = new_message(
            channel,
            msg_type,
            content,
            session=self.session,
            username="nbcluster-client",
            metadata=metadata,
            buffers=buffers,
            parent=parent,
        )
        self._by_parent[msg.msg_id]  # start collecting before anything can arrive
        await self.send_raw(self._encode(msg))
        return msg.msg_id

    def _encode(self, msg: Message) -> str | bytes:
        return encode_v1(msg) if self.v1 else encode_legacy(msg)

    async def next_for(self, msg_id: str, timeout: float) -> dict[str, Any]:
        """The next message whose parent is ``msg_id``."""
        return await asyncio.wait_for(self._by_parent[msg_id].get(), timeout)

    async def request(
        self, channel: str, msg_type: str, content: dict[str, Any], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a request and return its reply message (other messages of it are skipped)."""
        msg_id = await self.send(channel, msg_type, content)
        reply_type = msg_type.replace("_request", "_reply")
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
            if msg["msg_type"] == reply_type:
                return msg

    async def execute(
        self,
        code: str,
        timeout: float = 60.0,
        *,
        stdin: list[str] | None = None,
        silent: bool = False,
    ) -> ExecutionResult:
        """Run a cell; wait for its reply and the kernel's return to idle.

        ``stdin`` answers ``input()`` prompts in order.
        """
        msg_id = await self.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": not silent,
                "user_expressions": {},
                "allow_stdin": stdin is not None,
                "stop_on_error": True,
            },
        )
        answers = list(stdin or [])
        reply: dict[str, Any] | None = None
        idle = False
        outputs: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            msg = await self.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
            kind = msg["msg_type"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                reply = msg["content"]
            elif msg["channel"] == "stdin" and kind == "input_request":
                answer = answers.pop(0) if answers else ""
                await self.send("stdin", "input_reply", {"value": answer}, parent=msg["header"])
            elif msg["channel"] == "iopub":
                if kind == "status":
                    idle = msg["content"].get("execution_state") == "idle"
                else:
                    outputs.append(msg)
        return ExecutionResult(reply=reply, outputs=outputs)
