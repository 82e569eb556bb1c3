"""Object store for values too large for the replicated log.

A kernel's replicas put the pickled bytes of large values here and only a pointer (the key)
goes into the log. :class:`ObjectStore` is the whole interface; :class:`LocalDirectoryStore`
keeps objects as files in a directory (shared between replicas, or for one machine), and
:class:`InMemoryStore` keeps them in a dict (tests).
"""

from ._interface import (
    ObjectCorruptedError,
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
    validate_key,
)
from ._local import LocalDirectoryStore
from ._memory import InMemoryStore

__all__ = [
    "InMemoryStore",
    "LocalDirectoryStore",
    "ObjectCorruptedError",
    "ObjectNotFoundError",
    "ObjectStore",
    "StoreError",
    "validate_key",
]
