"""The Raft port's frame encryption: AES-256-GCM, in place of pysyncobj's Fernet.

pysyncobj encrypts and authenticates every frame with Fernet (AES-128-CBC and HMAC-SHA256,
base64). A Fernet round trip of a few hundred bytes took 39 us of CPU on the 2-core test
machine, an AES-GCM one 3.9 us; a trivial cell sends some twenty frames across its
replicas, which are CPU-bound there (``docs/consensus.md``, "Known pysyncobj limitations").

A sealed frame is ``version (1 byte) | timestamp (8, big-endian) | nonce (12) | ciphertext
and tag``; version and timestamp are authenticated as associated data, so the timestamp
that the port checks for order (``_raft_port``) cannot be altered. Nonces are random: one
key serves every replica and connection of a kernel for its life, far below the 2**32
messages per key that random 96-bit nonces allow (a kernel sends tens of frames per cell
and twenty heartbeats a second).

The key comes from the kernel's Raft password through HKDF-SHA256. The gateway makes that
password with ``secrets.token_hex(16)`` (128 random bits), so a slow password hash adds
nothing; a caller of ``PySyncObjLog`` must likewise pass a random password.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["FrameCipher", "FrameError"]

_VERSION: Final = b"\x01"
_HEADER: Final = struct.Struct(">cQ")  # version, timestamp
_NONCE_BYTES: Final = 12
_PREFIX: Final = _HEADER.size + _NONCE_BYTES
_SALT: Final = b"nbcluster raft frames"


class FrameError(ValueError):
    """A frame that is not sealed with this kernel's key (or not a sealed frame at all)."""


class FrameCipher:
    """Seals and opens the Raft port's frames. One per transport (``GuardedTransport``),
    used by its connections in the node's tick thread."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the frame key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_password(cls, password: str) -> FrameCipher:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"v1")
        return cls(hkdf.derive(password.encode()))

    def seal(self, data: bytes, timestamp: int) -> bytes:
        header = _HEADER.pack(_VERSION, timestamp)
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, data, header)

    @staticmethod
    def timestamp(token: bytes) -> int:
        """The sender's timestamp, unauthenticated until :meth:`open` succeeds."""
        _check_shape(token)
        return int(_HEADER.unpack_from(token)[1])

    def open(self, token: bytes) -> bytes:
        """The plaintext; raises :class:`FrameError` unless sealed with this key, unaltered."""
        _check_shape(token)
        try:
            return self._aead.decrypt(
                token[_HEADER.size : _PREFIX], token[_PREFIX:], token[: _HEADER.size]
            )
        except InvalidTag:
            raise FrameError("the frame is not sealed with this kernel's key") from None


def _check_shape(token: bytes) -> None:
    if len(token) < _PREFIX or token[:1] != _VERSION:
        raise FrameError("not a sealed frame")
