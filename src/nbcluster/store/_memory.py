"""An object store in a dict, for tests and single-process use."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ._interface import ObjectInfo, ObjectNotFoundError, validate_key

__all__ = ["InMemoryStore"]


class InMemoryStore:
    """:class:`~nbcluster.store.ObjectStore` in memory. ``puts``/``gets`` count the calls."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.puts = 0
        self.gets = 0

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        with self._lock:
            self._objects[key] = bytes(data)
            self.puts += 1

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            self.gets += 1
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFoundError(key) from None

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def keys(self) -> list[str]:
        """Every stored key, sorted."""
        with self._lock:
            return sorted(self._objects)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            found = [
                ObjectInfo(k, len(v)) for k, v in self._objects.items() if k.startswith(prefix)
            ]
        return iter(sorted(found, key=lambda info: info.key))
