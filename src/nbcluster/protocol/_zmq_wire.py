"""The Jupyter ZMQ wire format: ``[idents..., <IDS|MSG>, signature, header, parent, metadata,
content, buffers...]``, signed with HMAC over the four JSON parts.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from ._errors import ProtocolError
from ._message import Message

__all__ = ["DELIMITER", "Signer", "decode_zmq", "encode_zmq"]

DELIMITER = b"<IDS|MSG>"

_SCHEMES = {"hmac-sha256": hashlib.sha256, "hmac-sha1": hashlib.sha1, "hmac-md5": hashlib.md5}


class Signer:
    """Signs and verifies message parts with a kernel's key.

    One per kernel; the gateway signs what clients send and verifies what replicas send.
    An empty key disables signing, as in jupyter_client.
    """

    __slots__ = ("_digest", "_key")

    def __init__(self, key: bytes, scheme: str = "hmac-sha256") -> None:
        try:
            self._digest = _SCHEMES[scheme]
        except KeyError:
            raise ValueError(f"unsupported signature scheme {scheme!r}") from None
        self._key = key

    def sign(self, parts: Sequence[bytes]) -> bytes:
        if not self._key:
            return b""
        mac = hmac.new(self._key, digestmod=self._digest)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> bool:
        if not self._key:
            return True
        return hmac.compare_digest(signature, self.sign(parts))


def encode_zmq(msg: Message, signer: Signer, identities: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for sending ``msg`` on a ZMQ socket."""
    parts = (msg.header, msg.parent_header, msg.metadata, msg.content)
    return [*identities, DELIMITER, signer.sign(parts), *parts, *msg.buffers]


def decode_zmq(
    channel: str, frames: Sequence[bytes], signer: Signer, *, check_body: bool = False
) -> tuple[list[bytes], Message]:
    """Split received frames into identities and a message, verifying the signature.

    Raises :class:`ProtocolError` naming the problem (no delimiter, too few frames, bad
    signature, malformed header).
    """
    try:
        split = frames.index(DELIMITER)
    except ValueError:
        raise ProtocolError("ZMQ message has no <IDS|MSG> delimiter") from None
    rest = frames[split + 1 :]
    if len(rest) < 5:
        raise ProtocolError(
            f"ZMQ message has {len(rest)} frames after the delimiter, expected >= 5"
        )
    signature, header, parent, metadata, content = (bytes(f) for f in rest[:5])
    if not signer.verify(signature, (header, parent, metadata, content)):
        raise ProtocolError("message signature is invalid (wrong key or tampered message)")
    msg = Message.from_parts(
        channel,
        header,
        parent,
        metadata,
        content,
        [bytes(b) for b in rest[5:]],
        check_body=check_body,
    )
    return [bytes(i) for i in frames[:split]], msg
