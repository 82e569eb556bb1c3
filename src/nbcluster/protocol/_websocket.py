"""Websocket framings of Jupyter messages, as jupyter_server defines them.

- **legacy** (no subprotocol; the one ``jupyter_server``'s gateway client forces): a text frame
  holding one JSON object with ``channel``, ``header``, ``parent_header``, ``metadata``,
  ``content`` (plus ``msg_id``/``msg_type``/``buffers``); when there are binary buffers, a binary
  frame: a big-endian uint32 count ``n``, ``n`` uint32 offsets, the JSON, then the buffers.
- **v1** (subprotocol ``v1.kernel.websocket.jupyter.org``): a binary frame: a little-endian
  uint64 count of offsets, the offsets, then channel, header, parent, metadata, content and
  buffers back to back. No JSON is re-encoded on this path.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import orjson

from ._errors import ProtocolError
from ._message import CLIENT_CHANNELS, Message, dumps

__all__ = [
    "V1_SUBPROTOCOL",
    "decode_legacy",
    "decode_v1",
    "encode_legacy",
    "encode_v1",
]

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"


def _check_channel(channel: object, allowed: frozenset[str]) -> str:
    if not isinstance(channel, str):
        raise ProtocolError("message has no 'channel' string")
    if channel not in allowed:
        raise ProtocolError(f"unknown channel {channel!r}; expected one of {sorted(allowed)}")
    return channel


def _dict_part(msg: dict[str, Any], name: str, required: bool) -> bytes:
    value = msg.get(name)
    if value is None:
        if required:
            raise ProtocolError(f"message has no '{name}'")
        return b"{}"
    if not isinstance(value, dict):
        raise ProtocolError(f"message '{name}' must be a JSON object, got {type(value).__name__}")
    try:
        return dumps(value)
    except orjson.JSONEncodeError as exc:  # nested deeper than orjson writes (255 levels)
        raise ProtocolError(f"message '{name}' cannot be encoded: {exc}") from None


def decode_legacy(
    frame: str | bytes,
    allowed: frozenset[str] = CLIENT_CHANNELS,
    *,
    default_channel: str | None = None,
) -> Message:
    """Decode a legacy text frame (JSON) or legacy binary frame (offsets + JSON + buffers).

    A message without a ``channel`` is put on ``default_channel`` if one is given, as
    jupyter_server does with ``shell`` (its ``GatewayKernelClient`` sends none); else rejected.
    """
    buffers: list[bytes] = []
    if isinstance(frame, bytes):
        body, buffers = _split_legacy_binary(frame)
    else:
        body = frame.encode("utf-8")
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"websocket frame is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("websocket frame must hold a JSON object")
    named = msg.get("channel")
    channel = _check_channel(default_channel if named is None else named, allowed)
    return Message.from_parts(
        channel,
        _dict_part(msg, "header", True),
        _dict_part(msg, "parent_header", False),
        _dict_part(msg, "metadata", False),
        _dict_part(msg, "content", True),
        buffers,
    )


def _split_legacy_binary(frame: bytes) -> tuple[bytes, list[bytes]]:
    if len(frame) < 8:
        raise ProtocolError("binary websocket frame is too short for its offset table")
    (count,) = struct.unpack_from("!I", frame, 0)
    if count < 1 or 4 * (count + 1) > len(frame):
        raise ProtocolError(f"binary websocket frame declares {count} parts, which does not fit")
    offsets = list(struct.unpack_from(f"!{count}I", frame, 4))
    offsets.append(len(frame))
    if offsets[0] != 4 * (count + 1) or any(a > b for a, b in itertools.pairwise(offsets)):
        raise ProtocolError("binary websocket frame has inconsistent offsets")
    parts = [frame[offsets[i] : offsets[i + 1]] for i in range(count)]
    return parts[0], parts[1:]


def encode_legacy(msg: Message) -> str | bytes:
    """Encode for a legacy client, splicing the raw JSON parts into one object."""
    body = b"".join(
        (
            b'{"channel":"',
            msg.channel.encode(),
            b'","header":',
            msg.header,
            b',"msg_id":',
            dumps(msg.msg_id),
            b',"msg_type":',
            dumps(msg.msg_type),
            b',"parent_header":',
            msg.parent_header,
            b',"metadata":',
            msg.metadata,
            b',"content":',
            msg.content,
            b',"buffers":[]}',
        )
    )
    if not msg.buffers:
        return body.decode("utf-8")
    parts = [body, *msg.buffers]
    count = len(parts)
    offsets = [4 * (count + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{count + 1}I", count, *offsets) + b"".join(parts)


def encode_v1(msg: Message) -> bytes:
    """Encode for a ``v1.kernel.websocket.jupyter.org`` client."""
    parts = [msg.header, msg.parent_header, msg.metadata, msg.content, *msg.buffers]
    channel = msg.channel.encode("utf-8")
    count = len(parts) + 2  # channel start, each part's start, and the end
    offsets = [8 * (count + 1)]
    offsets.append(offsets[0] + len(channel))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    table = struct.pack(f"<{count + 1}Q", count, *offsets)
    return b"".join((table, channel, *parts))


def decode_v1(frame: str | bytes, allowed: frozenset[str] = CLIENT_CHANNELS) -> Message:
    """Decode a ``v1.kernel.websocket.jupyter.org`` binary frame."""
    if isinstance(frame, str):
        raise ProtocolError("the v1 websocket protocol carries binary frames only")
    if len(frame) < 8:
        raise ProtocolError("v1 websocket frame is too short for its offset table")
    (count,) = struct.unpack_from("<Q", frame, 0)
    if count < 6 or 8 * (count + 1) > len(frame):
        raise ProtocolError(f"v1 websocket frame declares {count} offsets, which does not fit")
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    if (
        offsets[0] != 8 * (count + 1)
        or offsets[-1] != len(frame)
        or any(a > b for a, b in itertools.pairwise(offsets))
    ):
        raise ProtocolError("v1 websocket frame has inconsistent offsets")
    pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    try:
        channel_name = pieces[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("v1 websocket frame has a channel name that is not UTF-8") from None
    channel = _check_channel(channel_name, allowed)
    header, parent, metadata, content, *buffers = pieces[1:]
    return Message.from_parts(channel, header, parent or b"{}", metadata or b"{}", content, buffers)
