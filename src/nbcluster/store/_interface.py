"""The object store interface: three calls, keys that every backend can hold."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ObjectCorruptedError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "StoreError",
    "validate_key",
]

#: One or more ``/``-separated segments of letters, digits, ``_``, ``-`` and ``.``; a segment
#: does not start with ``.`` (so no ``..``, no hidden files) and the key is at most 512 long.
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
MAX_KEY_LENGTH = 512


class StoreError(Exception):
    """An object store operation failed (I/O, missing or corrupt object)."""


class ObjectNotFoundError(StoreError, LookupError):
    """No object is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object stored under key {key!r}")
        self.key = key


class ObjectCorruptedError(StoreError):
    """The object stored under the key does not match its checksum (or is truncated)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"object {key!r} is corrupt: {detail}")
        self.key = key


def validate_key(key: str) -> str:
    """Return ``key`` if every backend can store it, else raise ``ValueError``."""
    if not isinstance(key, str):
        raise ValueError(f"object key must be a str, got {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"object key is longer than {MAX_KEY_LENGTH} characters")
    if not _KEY.fullmatch(key):
        raise ValueError(
            f"invalid object key {key!r}: use '/'-separated segments of letters, digits, "
            "'_', '-' and '.', none starting with '.'"
        )
    return key


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object as :meth:`ObjectStore.list` reports it."""

    key: str
    size: int


class ObjectStore(Protocol):
    """Where large values live. Implementations are safe to call from several threads.

    Every method raises :class:`StoreError` (or a subclass) when the operation fails and
    ``ValueError`` for a key that :func:`validate_key` rejects.
    """

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object. When it returns, the
        object is complete and visible to every reader; a reader never sees part of it."""

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; :class:`ObjectNotFoundError` if there are none,
        :class:`ObjectCorruptedError` if they fail their checksum."""

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; no error if there is none."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every complete object whose key starts with ``prefix``, in key order (for
        housekeeping: ``nbcluster store ls|du|gc``)."""
        ...
