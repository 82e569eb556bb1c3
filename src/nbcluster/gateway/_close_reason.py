"""The reason text of a websocket close frame, made safe to send.

RFC 6455 caps a close reason at 123 bytes of UTF-8. A reason that names a bad value (a host's
malformed field, a kernel id from the URL) can hold multi-byte characters or lone surrogates;
cut by characters it can exceed the cap or fail to encode, and the server then drops the
connection without a close frame instead of saying why. Every close with a reason the gateway
did not write itself goes through :func:`close_reason`.
"""

from __future__ import annotations

__all__ = ["MAX_CLOSE_REASON_BYTES", "close_reason"]

#: 125 bytes of control-frame payload, less the 2-byte close code.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """``text`` as valid UTF-8 of at most 123 bytes, cut on a character boundary with "…"."""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return encoded.decode("utf-8")
    ellipsis = "…".encode()
    cut = encoded[: MAX_CLOSE_REASON_BYTES - len(ellipsis)]
    return cut.decode("utf-8", errors="ignore") + "…"
