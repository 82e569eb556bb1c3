"""An object store in Redis: each object is a small manifest plus its data in chunks.

:func:`~nbcluster.store.open_store` builds one for a ``redis://``, ``rediss://`` or ``unix://``
URL (``RedisStore.from_url``); kernel replicas then ``put``/``get`` large values through it and
``nbcluster store`` lists, deletes and collects garbage (:meth:`RedisStore.gc_orphans`).

Layout under the store's ``prefix`` (``nbcluster/`` unless the URL says ``?prefix=``):

* ``{prefix}obj/{key}``: the manifest, a small JSON map ``{"format", "version", "size",
  "chunks", "digest"}``; ``digest`` is the hex xxh3-128 of the whole object.
* ``{prefix}chunk/{key}/{version}/{i}``: chunk ``i`` of that version of the object, each
  ``chunk_size`` bytes but the last (Redis caps a value at 512 MB, and chunks stream without
  holding a second copy of the object on either side).

A ``put`` writes the chunks of a new, random ``version`` first, then swaps the manifest in one
command (``GETSET``): a reader sees the old object or the new one, never a mix. It then deletes
the chunks of the version it replaced. Chunks of a ``put`` that never reached its manifest (the
writer died, the server refused) are orphans: :meth:`RedisStore.gc_orphans` removes them.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import redis
import xxhash

from .._redis import TRANSIENT_ERRORS, connect, describe
from ._interface import (
    ObjectCorruptedError,
    ObjectInfo,
    ObjectNotFoundError,
    StoreError,
    validate_key,
)
from ._retry import retrying

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Manifest format written by this module.
_FORMAT = 1
#: At most this many chunk bytes go to (or come from) the server in one pipeline.
_BATCH_BYTES = 64 * 2**20
#: Keys per MGET / UNLINK command.
_KEYS_PER_COMMAND = 500
#: How often ``get`` starts over when a concurrent ``put`` replaced the object mid-read.
_GET_ATTEMPTS = 5
_DEFAULT_CHUNK_SIZE = 8 * 2**20
#: Redis refuses values over 512 MB.
_MAX_CHUNK_SIZE = 512 * 2**20


def _new_version() -> str:
    """A fresh version token: the time in milliseconds (hex, so :meth:`RedisStore.gc_orphans`
    can tell a put in progress from an abandoned one), then random bits."""
    return f"{time.time_ns() // 1_000_000:x}-{secrets.token_hex(8)}"


def _version_age(version: str, now: float) -> float:
    """Seconds since ``version`` was made; infinite if it is not one of ours."""
    try:
        return now - int(version.split("-", 1)[0], 16) / 1000
    except ValueError:
        return float("inf")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True, slots=True)
class _Manifest:
    version: str
    size: int
    chunks: int
    digest: str

    def encode(self) -> bytes:
        return json.dumps(
            {
                "format": _FORMAT,
                "version": self.version,
                "size": self.size,
                "chunks": self.chunks,
                "digest": self.digest,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes) -> _Manifest:
        """The manifest stored for ``key``; :class:`ObjectCorruptedError` if unreadable."""
        try:
            fields = json.loads(raw)
            if fields["format"] != _FORMAT:
                raise ValueError(f"unknown manifest format {fields['format']!r}")
            made = cls(
                str(fields["version"]),
                int(fields["size"]),
                int(fields["chunks"]),
                str(fields["digest"]),
            )
            if made.size < 0 or made.chunks < 0 or "/" in made.version:
                raise ValueError("bad field values")
        except (ValueError, KeyError, TypeError) as exc:
            raise ObjectCorruptedError(key, f"unreadable manifest ({exc})") from None
        return made


class RedisStore:
    """:class:`~nbcluster.store.ObjectStore` in a Redis server (see the module docstring for the
    key layout). Safe to call from several threads: the client keeps a connection pool.

    Commands failing with a connection error, a timeout or "loading" are retried with backoff a
    few times, then raise :class:`~nbcluster.store.StoreError` naming the key and the server;
    any other Redis error raises it at once. Needs Redis 4.0 or later (``UNLINK``).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "nbcluster/",
        chunk_size: int = _DEFAULT_CHUNK_SIZE,
    ) -> None:
        """Keep objects under ``prefix`` in the server ``client`` talks to (the store owns the
        client: :meth:`close` closes it). ``client`` must return bytes (no
        ``decode_responses``)."""
        if not 0 < chunk_size <= _MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 byte and 512 MB, got {chunk_size}")
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client without decode_responses")
        self._client = client
        self.prefix = prefix
        self.chunk_size = chunk_size
        self._objects = f"{prefix}obj/"
        self._chunks = f"{prefix}chunk/"
        self._where = describe(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "nbcluster/",
        chunk_size: int = _DEFAULT_CHUNK_SIZE,
    ) -> RedisStore:
        """A store with a client of its own for ``url`` (what :func:`open_store` calls). The
        client gives up on a silent server after 30 s (10 s to connect) and leaves retries to
        this class, so that a dead server is reported after a bounded time."""
        # Objects arrive in chunks of megabytes: read the socket in big pieces (about 20 %
        # faster than redis-py's 64 KB default for a 100 MB get).
        client = connect(url, socket_read_size=2**20)
        return cls(client, prefix=prefix, chunk_size=chunk_size)

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    # -- names ----------------------------------------------------------------------------

    def _manifest_name(self, key: str) -> str:
        return self._objects + key

    def _chunk_names(self, key: str, manifest: _Manifest) -> list[str]:
        base = f"{self._chunks}{key}/{manifest.version}/"
        return [f"{base}{i}" for i in range(manifest.chunks)]

    # -- plumbing ---------------------------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        return retrying(what, call, TRANSIENT_ERRORS)

    def _failed(self, doing: str, exc: redis.RedisError) -> StoreError:
        return StoreError(f"{doing} at {self._where} failed: {type(exc).__name__}: {exc}")

    def _get_raw(self, name: str) -> bytes | None:
        return cast("bytes | None", self._client.get(name))

    def _pipeline(self, fill: Callable[[Any], None], transaction: bool = False) -> list[Any]:
        pipe = self._client.pipeline(transaction=transaction)
        fill(pipe)
        return pipe.execute()

    def _scan(self, pattern: str) -> list[bytes]:
        return list(self._client.scan_iter(match=pattern, count=1000))

    def _mget(self, names: Sequence[str]) -> list[bytes | None]:
        return cast("list[bytes | None]", self._client.mget(names))

    def _unlink(self, names: Sequence[str]) -> int:
        return self._client.unlink(*names)

    def _unlink_quietly(self, key: str, names: Sequence[str], retry: bool = True) -> None:
        """Delete chunk keys no manifest points at any more; failing that, leave them to
        :meth:`gc_orphans` (the object itself is already in its new state)."""
        try:
            for batch in _batches(names, _KEYS_PER_COMMAND):
                if retry:
                    self._retry(
                        f"deleting old chunks of object {key!r} from {self._where}",
                        partial(self._unlink, batch),
                    )
                else:
                    self._unlink(batch)
        except (StoreError, redis.RedisError) as exc:
            log.warning("left %d chunk(s) of %r for gc_orphans: %s", len(names), key, exc)

    # -- ObjectStore ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (called by the kernel replicas for large values)."""
        validate_key(key)
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        size = view.nbytes
        size_of_chunk = self.chunk_size
        manifest = _Manifest(
            version=_new_version(),
            size=size,
            chunks=-(-size // size_of_chunk),
            digest=xxhash.xxh3_128_hexdigest(view),
        )
        names = self._chunk_names(key, manifest)
        what = f"writing object {key!r} to {self._where}"
        per_batch = max(1, _BATCH_BYTES // size_of_chunk)
        try:
            for first in range(0, len(names), per_batch):

                def fill(pipe: Any, first: int = first) -> None:
                    for i in range(first, min(first + per_batch, len(names))):
                        pipe.set(names[i], view[i * size_of_chunk : (i + 1) * size_of_chunk])

                self._retry(what, partial(self._pipeline, fill))
        except redis.RedisError as exc:
            # The server answered but refused (e.g. out of memory): drop what was written, in
            # one try. (When it stopped answering, gc_orphans collects the chunks later.)
            self._unlink_quietly(key, names, retry=False)
            raise self._failed(f"writing object {key!r}", exc) from exc
        try:
            # The switch: readers see the old manifest or this one.
            old = cast(
                "bytes | None",
                self._retry(
                    what,
                    lambda: self._client.getset(self._manifest_name(key), manifest.encode()),
                ),
            )
        except redis.RedisError as exc:
            raise self._failed(f"writing object {key!r}", exc) from exc
        if old is None:
            return
        try:
            previous = _Manifest.decode(key, old)
        except ObjectCorruptedError as exc:
            log.warning("replaced an unreadable manifest; its chunks are left: %s", exc)
            return
        # A retried GETSET whose first try did land returns our own manifest: keep its chunks.
        if previous.version != manifest.version:
            self._unlink_quietly(key, self._chunk_names(key, previous))

    def get(self, key: str) -> bytes:
        """The object under ``key`` (called by kernel replicas that resolve a pointer)."""
        validate_key(key)
        name = self._manifest_name(key)
        what = f"reading object {key!r} from {self._where}"
        try:
            raw = self._retry(what, lambda: self._get_raw(name))
            for _ in range(_GET_ATTEMPTS):
                if raw is None:
                    raise ObjectNotFoundError(key)
                manifest = _Manifest.decode(key, raw)
                chunks = self._read_chunks(what, key, manifest)
                if chunks is not None:
                    return self._verified(key, manifest, chunks)
                now = self._retry(what, lambda: self._get_raw(name))
                if now == raw:
                    raise ObjectCorruptedError(
                        key,
                        f"a chunk of version {manifest.version} is missing "
                        f"(of {manifest.chunks}) while its manifest is current",
                    )
                raw = now  # replaced (or deleted) while we read: start over
        except redis.RedisError as exc:
            raise self._failed(f"reading object {key!r}", exc) from exc
        raise StoreError(
            f"object {key!r} at {self._where} was replaced {_GET_ATTEMPTS} times while being "
            "read; try again"
        )

    def _read_chunks(self, what: str, key: str, manifest: _Manifest) -> list[bytes] | None:
        """The chunks of ``manifest``, or None when one is missing."""
        names = self._chunk_names(key, manifest)
        chunks: list[bytes] = []
        per_batch = max(1, _BATCH_BYTES // max(1, self.chunk_size))
        for batch in _batches(names, per_batch):

            def fill(pipe: Any, batch: Sequence[str] = batch) -> None:
                for chunk_name in batch:
                    pipe.get(chunk_name)

            got = cast(
                "list[bytes | None]",
                self._retry(what, partial(self._pipeline, fill)),
            )
            for value in got:
                if value is None:
                    return None
                chunks.append(value)
        return chunks

    @staticmethod
    def _verified(key: str, manifest: _Manifest, chunks: list[bytes]) -> bytes:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) != manifest.size:
            raise ObjectCorruptedError(
                key, f"{len(data)} bytes stored, the manifest says {manifest.size}"
            )
        if xxhash.xxh3_128_hexdigest(data) != manifest.digest:
            raise ObjectCorruptedError(key, "checksum mismatch (xxh3_128)")
        return data

    def delete(self, key: str) -> None:
        """Remove the object under ``key``, if any (``nbcluster store gc`` and kernel cleanup)."""
        validate_key(key)
        name = self._manifest_name(key)

        def fill(pipe: Any) -> None:
            pipe.get(name)
            pipe.delete(name)

        try:
            old = cast(
                "bytes | None",
                self._retry(
                    f"deleting object {key!r} from {self._where}",
                    lambda: self._pipeline(fill, transaction=True)[0],
                ),
            )
        except redis.RedisError as exc:
            raise self._failed(f"deleting object {key!r}", exc) from exc
        if old is None:
            return
        try:
            previous = _Manifest.decode(key, old)
        except ObjectCorruptedError as exc:
            log.warning("deleted an unreadable manifest; its chunks are left: %s", exc)
            return
        self._unlink_quietly(key, self._chunk_names(key, previous))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects (those with a manifest) whose key starts with ``prefix``, in key order (for
        ``nbcluster store ls|du|gc``)."""
        what = f"listing objects in {self._where}"
        found: list[ObjectInfo] = []
        try:
            names = self._retry(
                what, lambda: self._scan(_glob_escape(self._objects + prefix) + "*")
            )
            keys = sorted({name.decode()[len(self._objects) :] for name in names})
            for batch in _batches(keys, _KEYS_PER_COMMAND):
                raws = self._retry(
                    what,
                    partial(self._mget, [self._manifest_name(k) for k in batch]),
                )
                for key, raw in zip(batch, raws, strict=True):
                    if raw is None:
                        continue  # deleted since the scan
                    try:
                        size = _Manifest.decode(key, raw).size
                    except ObjectCorruptedError as exc:
                        log.warning("listing: %s", exc)
                        size = 0
                    found.append(ObjectInfo(key, size))
        except redis.RedisError as exc:
            raise self._failed("listing objects", exc) from exc
        return iter(found)

    # -- housekeeping -----------------------------------------------------------------------

    def gc_orphans(self, older_than: float = 3600.0) -> int:
        """Delete chunks that no manifest points at and that are older than ``older_than``
        seconds (younger ones may belong to a ``put`` in progress); returns how many.

        Orphans come from a writer killed (or refused) between writing its chunks and swapping
        in its manifest, and from clean-ups that failed after an overwrite or delete. Called by
        operators (``nbcluster store gc``); keys whose manifest is unreadable are left alone.
        """
        what = f"collecting orphan chunks in {self._where}"
        now = time.time()
        try:
            names = self._retry(what, lambda: self._scan(_glob_escape(self._chunks) + "*"))
            by_key: dict[str, list[tuple[str, str]]] = {}
            for raw_name in names:
                name = raw_name.decode()
                parts = name[len(self._chunks) :].rsplit("/", 2)
                if len(parts) != 3:
                    continue  # not a chunk name of ours
                key, version, _index = parts
                by_key.setdefault(key, []).append((version, name))
            doomed: list[str] = []
            keys = sorted(by_key)
            for batch in _batches(keys, _KEYS_PER_COMMAND):
                raws = self._retry(
                    what,
                    partial(self._mget, [self._manifest_name(k) for k in batch]),
                )
                for key, raw in zip(batch, raws, strict=True):
                    current: str | None = None
                    if raw is not None:
                        try:
                            current = _Manifest.decode(key, raw).version
                        except ObjectCorruptedError:
                            continue
                    doomed.extend(
                        name
                        for version, name in by_key[key]
                        if version != current and _version_age(version, now) >= older_than
                    )
            for doomed_batch in _batches(doomed, _KEYS_PER_COMMAND):
                self._retry(what, partial(self._unlink, doomed_batch))
        except redis.RedisError as exc:
            raise self._failed("collecting orphan chunks", exc) from exc
        return len(doomed)
