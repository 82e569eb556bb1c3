"""Object store for values too large for the replicated log.

A kernel's replicas put the pickled bytes of large values here and only a pointer (the key)
goes into the log. :class:`ObjectStore` is the whole interface; :class:`LocalDirectoryStore`
keeps objects as files in a directory (shared between replicas, or for one machine), and
:class:`InMemoryStore` keeps them in a dict (tests); ``RedisStore`` and ``S3Store`` (imported on
demand by :func:`open_store`) keep them in Redis and S3.
"""

from ._interface import (
    ObjectCorruptedError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
    validate_key,
)
from ._local import LocalDirectoryStore
from ._memory import InMemoryStore
from ._retry import retrying
from ._tombstones import TOMBSTONE_PREFIX, tombstone_key
from ._url import open_store, store_url_for_directory

__all__ = [
    "TOMBSTONE_PREFIX",
    "InMemoryStore",
    "LocalDirectoryStore",
    "ObjectCorruptedError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "StoreError",
    "open_store",
    "retrying",
    "store_url_for_directory",
    "tombstone_key",
    "validate_key",
]
