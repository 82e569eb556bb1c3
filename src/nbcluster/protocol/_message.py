"""The in-flight form of a Jupyter message: raw JSON parts plus the few parsed fields we route on.

The gateway moves messages between websockets and ZMQ sockets without re-encoding their bodies:
header, parent header, metadata and content stay the JSON bytes they arrived as, and only the
header and parent header are parsed (we need ``msg_id``, ``msg_type`` and the parent's
``msg_id`` to route replies).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from ._errors import ProtocolError

__all__ = ["CLIENT_CHANNELS", "KERNEL_CHANNELS", "Message", "dumps", "new_message"]

#: Channels a client may send on.
CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})
#: Channels a kernel publishes or replies on.
KERNEL_CHANNELS = frozenset({"shell", "control", "stdin", "iopub"})

PROTOCOL_VERSION = "5.4"


def dumps(obj: Any) -> bytes:
    """Serialise a JSON part the way every message part is serialised here."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _parse_object(raw: bytes, part: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message {part} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"message {part} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(slots=True)
class Message:
    """One Jupyter message on one channel.

    Built by the websocket and ZMQ decoders; the raw parts are what gets signed and forwarded.
    """

    channel: str
    header: bytes
    parent_header: bytes
    metadata: bytes
    content: bytes
    buffers: list[bytes] = field(default_factory=list)
    msg_id: str = ""
    msg_type: str = ""
    parent_msg_id: str | None = None
    _content: dict[str, Any] | None = None

    @classmethod
    def from_parts(
        cls,
        channel: str,
        header: bytes,
        parent_header: bytes,
        metadata: bytes,
        content: bytes,
        buffers: list[bytes] | None = None,
        *,
        check_body: bool = True,
    ) -> Message:
        """Parse the routing fields out of raw parts, checking that each part is a JSON object.

        ``check_body=False`` skips parsing metadata and content: used for messages that come from a
        kernel whose HMAC signature was verified, where re-parsing large outputs would cost time.
        """
        hdr = _parse_object(header, "header")
        msg_id = hdr.get("msg_id")
        msg_type = hdr.get("msg_type")
        if not isinstance(msg_id, str) or not msg_id:
            raise ProtocolError("message header has no 'msg_id' string")
        if not isinstance(msg_type, str) or not msg_type:
            raise ProtocolError("message header has no 'msg_type' string")
        parent = _parse_object(parent_header, "parent_header") if parent_header != b"{}" else {}
        parent_id = parent.get("msg_id")
        content_obj = None
        if check_body:
            _parse_object(metadata, "metadata")
            content_obj = _parse_object(content, "content")
        return cls(
            channel=channel,
            header=header,
            parent_header=parent_header,
            metadata=metadata,
            content=content,
            buffers=list(buffers or ()),
            msg_id=msg_id,
            msg_type=msg_type,
            parent_msg_id=parent_id if isinstance(parent_id, str) and parent_id else None,
            _content=content_obj,
        )

    @property
    def content_dict(self) -> dict[str, Any]:
        """The parsed content, parsed on first use."""
        if self._content is None:
            self._content = _parse_object(self.content, "content")
        return self._content

    @property
    def header_dict(self) -> dict[str, Any]:
        """The parsed header (parsed again on each call: used off the hot path)."""
        return _parse_object(self.header, "header")

    def to_dict(self) -> dict[str, Any]:
        """The message as jupyter_client represents it; used by tests and the client helpers."""
        return {
            "channel": self.channel,
            "header": self.header_dict,
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "parent_header": orjson.loads(self.parent_header),
            "metadata": orjson.loads(self.metadata),
            "content": self.content_dict,
            "buffers": list(self.buffers),
        }


def new_message(
    channel: str,
    msg_type: str,
    content: dict[str, Any],
    *,
    parent: Message | bytes | dict[str, Any] | None = None,
    session: str = "nbcluster-gateway",
    username: str = "nbcluster",
    metadata: dict[str, Any] | None = None,
    buffers: list[bytes] | None = None,
) -> Message:
    """Build a fresh message; the gateway uses it for its own requests and synthesised replies.

    ``parent`` may be a message or a raw header (either becomes the parent header verbatim), or
    a header dict.
    """
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "version": PROTOCOL_VERSION,
    }
    parent_raw: bytes
    parent_id: Any
    if isinstance(parent, Message):
        parent_raw, parent_id = parent.header, parent.msg_id
    elif isinstance(parent, bytes):
        parent_raw, parent_id = parent, _parse_object(parent, "parent_header").get("msg_id")
    elif parent:
        parent_raw, parent_id = dumps(parent), parent.get("msg_id")
    else:
        parent_raw, parent_id = b"{}", None
    return Message(
        channel=channel,
        header=dumps(header),
        parent_header=parent_raw,
        metadata=dumps(metadata or {}),
        content=dumps(content),
        buffers=list(buffers or ()),
        msg_id=msg_id,
        msg_type=msg_type,
        parent_msg_id=parent_id if isinstance(parent_id, str) else None,
        _content=content,
    )
