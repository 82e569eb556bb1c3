"""The job store in Redis, for a gateway whose state must live off its machine.

The gateway's job manager is the only writer, as with :class:`~._filestore.FileJobStore`: it
builds one :class:`RedisJobStore` (:meth:`RedisJobStore.from_url` for a configured URL), calls
:meth:`~RedisJobStore.save` at every state change, :meth:`~RedisJobStore.append_log` as output
arrives and :meth:`~RedisJobStore.load_all` at start-up (a restarted gateway, here or on another
machine, finds every standard job where it was); the API reads logs with
:meth:`~RedisJobStore.read_log`.

Layout under ``prefix`` (``nbcluster/jobs/`` by default):

* ``{prefix}job/{id}``: the job (:class:`~nbcluster.jobs._model.Job` as JSON);
* ``{prefix}index``: a sorted set of job ids scored by ``created``, the order of ``load_all``;
* ``{prefix}log/{id}``: the job's output, grown with ``APPEND`` (in a small Lua script that
  enforces the cap) and read with ``GETRANGE``.

``save`` and ``delete`` change the record and the index in one ``MULTI``/``EXEC`` transaction.
Logs keep at most :data:`~._filestore.LOG_LIMIT` bytes (16 MiB) of output per job, then the
truncation notice, as in the file store. Job ids are checked first
(:func:`~._filestore.validate_job_id`, :class:`ValueError`).

Connection errors, timeouts and "loading" replies are retried a few times with exponential
backoff; then, or at once for any other Redis error, :class:`~._filestore.JobStoreError` is
raised naming the operation and the server (as a URL without credentials). Every command is
safe to repeat except a log append: a retry after a reply was lost may store that piece of
output twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

import redis

from .._redis import TRANSIENT_ERRORS, connect, describe
from ..store import retrying
from ._filestore import (
    LOG_LIMIT,
    JobStoreError,
    parse_job_record,
    truncated_notice,
    validate_job_id,
)
from ._model import Job

__all__ = ["RedisJobStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Keys per MGET in ``load_all``.
_KEYS_PER_COMMAND = 500

#: KEYS[1]: the log; ARGV: data, limit, notice. Appends what fits under the limit, then the
#: notice once; returns the log's length.
_APPEND_CAPPED = """
local size = redis.call('STRLEN', KEYS[1])
local limit = tonumber(ARGV[2])
if size > limit then return size end
local data = ARGV[1]
local room = limit - size
if #data <= room then return redis.call('APPEND', KEYS[1], data) end
return redis.call('APPEND', KEYS[1], string.sub(data, 1, room) .. ARGV[3])
"""


class RedisJobStore:
    """:class:`~nbcluster.jobs._store.JobStore` in a Redis server (see the module docstring for
    the layout). Safe to call from several threads (the client keeps a connection pool), but
    meant for one writer: the gateway's job manager.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "nbcluster/jobs/",
        *,
        log_limit: int = LOG_LIMIT,
        attempts: int = 4,
        first_delay: float = 0.05,
    ) -> None:
        """Keep jobs under ``prefix`` in the server ``client`` talks to (the store owns the
        client: :meth:`close` closes it; it must return bytes, no ``decode_responses``).
        ``log_limit``: bytes of output kept per job. A transient error is retried up to
        ``attempts`` calls in all, ``first_delay`` seconds apart, doubling (with jitter)."""
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisJobStore needs a client without decode_responses")
        if log_limit < 0:
            raise ValueError(f"log_limit must be 0 or more, got {log_limit}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self._client = client
        self.prefix = prefix
        self.log_limit = log_limit
        self._attempts = attempts
        self._first_delay = first_delay
        self._index = f"{prefix}index"
        self._where = describe(client)
        self._notice = truncated_notice(log_limit)
        self._append = client.register_script(_APPEND_CAPPED)

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "nbcluster/jobs/", *, log_limit: int = LOG_LIMIT
    ) -> RedisJobStore:
        """A store with a client of its own for ``url`` (``redis://``, ``rediss://``,
        ``unix://``): what the gateway builds from its configuration. The client gives up on a
        silent server after 30 s (10 s to connect) and leaves retries to this class, so that a
        dead server is reported after a bounded time."""
        return cls(connect(url), prefix=prefix, log_limit=log_limit)

    def close(self) -> None:
        """Close the client's connections (the gateway calls it on shutdown)."""
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisJobStore({self._where!r}, prefix={self.prefix!r})"

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job/{validate_job_id(job_id)}"

    def _log_key(self, job_id: str) -> str:
        return f"{self.prefix}log/{validate_job_id(job_id)}"

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried on transient errors; :class:`JobStoreError` naming ``what`` and
        the server when they persist or on any other Redis error."""
        where = f"{what} at {self._where}"
        try:
            return retrying(
                where,
                call,
                TRANSIENT_ERRORS,
                self._attempts,
                self._first_delay,
                error=JobStoreError,
            )
        except JobStoreError:
            raise
        except redis.RedisError as exc:
            raise JobStoreError(f"{where} failed: {type(exc).__name__}: {exc}") from exc

    def _transaction(self, fill: Callable[[Any], None]) -> list[Any]:
        pipe = self._client.pipeline(transaction=True)
        fill(pipe)
        results: list[Any] = pipe.execute()
        return results

    def save(self, job: Job) -> None:
        """Create or replace ``job``'s record and its place in the index, in one transaction:
        the job manager calls it at every state change."""
        key = self._job_key(job.id)
        data = job.model_dump_json().encode()

        def fill(pipe: Any) -> None:
            pipe.set(key, data)
            pipe.zadd(self._index, {job.id: job.created})

        self._retry(f"saving job {job.id}", lambda: self._transaction(fill))

    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown. :class:`JobStoreError` naming the key if its record is
        unreadable; :class:`ValueError` for an invalid id."""
        key = self._job_key(job_id)
        raw = self._retry(
            f"reading job {job_id}", lambda: cast("bytes | None", self._client.get(key))
        )
        return None if raw is None else parse_job_record(raw, job_id, f"{key!r} at {self._where}")

    def load_all(self) -> list[Job]:
        """Every job in the index, oldest first (by ``created``, then id): what the job manager
        calls at start-up. Unreadable records, and index entries without a record, are skipped
        with a logged error naming the key."""
        members = self._retry(
            "listing jobs",
            lambda: cast("list[bytes]", self._client.zrange(self._index, 0, -1)),
        )
        ids: list[str] = []
        for member in members:
            job_id = member.decode(errors="replace")
            try:
                validate_job_id(job_id)
            except ValueError:
                log.error(
                    "skipping %r in %s at %s: not a valid job id", job_id, self._index, self._where
                )
                continue
            ids.append(job_id)
        jobs: list[Job] = []
        for start in range(0, len(ids), _KEYS_PER_COMMAND):
            batch = ids[start : start + _KEYS_PER_COMMAND]
            keys = [self._job_key(job_id) for job_id in batch]
            values = self._retry("reading jobs", partial(self._mget, keys))
            for job_id, key, raw in zip(batch, keys, values, strict=True):
                if raw is None:
                    log.error("skipping job %s: in %s but %s is missing", job_id, self._index, key)
                    continue
                try:
                    jobs.append(parse_job_record(raw, job_id, f"{key!r} at {self._where}"))
                except JobStoreError as exc:
                    log.error("skipping job record %s: %s", key, exc)
        jobs.sort(key=lambda job: (job.created, job.id))
        return jobs

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        return cast("list[bytes | None]", self._client.mget(keys))

    def delete(self, job_id: str) -> None:
        """Forget the job, its index entry and its log, in one transaction; no error if
        unknown."""
        keys = [self._job_key(job_id), self._log_key(job_id)]

        def fill(pipe: Any) -> None:
            pipe.delete(*keys)
            pipe.zrem(self._index, job_id)

        self._retry(f"deleting job {job_id}", lambda: self._transaction(fill))

    def append_log(self, job_id: str, data: bytes) -> None:
        """Append ``data`` (output of the job) to its log, up to the cap (module docstring):
        the job manager calls it as output arrives from the worker."""
        key = self._log_key(job_id)
        if not data:
            return
        args: list[bytes | int] = [bytes(data), self.log_limit, self._notice]
        self._retry(
            f"appending to the log of job {job_id}",
            lambda: self._append(keys=[key], args=args),
        )

    def log_size(self, job_id: str) -> int:
        """How many bytes the job's log holds (0 when it has none)."""
        key = self._log_key(job_id)
        return self._retry(
            f"measuring the log of job {job_id}",
            lambda: int(self._client.strlen(key)),
        )

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """The job's log from byte ``offset`` on; empty when there is nothing more (or no log).
        The API calls it to show or follow a job's output."""
        if offset < 0:
            raise ValueError(f"offset must be 0 or more, got {offset}")
        key = self._log_key(job_id)
        return self._retry(
            f"reading the log of job {job_id}",
            lambda: cast("bytes", self._client.getrange(key, offset, -1)),
        )
