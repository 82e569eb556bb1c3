"""Errors raised when a Jupyter message cannot be accepted."""

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """A frame or message is malformed; the text names what is wrong.

    Raised by the decoders in this package; callers log it, count it and keep serving.
    """
