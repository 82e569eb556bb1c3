"""Where jobs are kept: the contract (:class:`JobStore`) that the embedded file store and
Redis fulfil, and :func:`open_job_store`, which picks one.

The gateway's job manager is the only writer: it saves a job at every state change and loads
them all at start-up (a restarted gateway finds every standard job where it was). Log output is
kept beside the job, appended as it arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ._model import Job

__all__ = ["JobStore", "open_job_store"]


class JobStore(Protocol):
    def save(self, job: Job) -> None:
        """Create or replace the job's record (atomically: a reader sees the old or the new)."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def load_all(self) -> list[Job]:
        """Every stored job, oldest first (by ``created``). Unreadable records are skipped
        with a logged error naming them."""
        ...

    def delete(self, job_id: str) -> None:
        """Forget a job and its log; no error if unknown."""
        ...

    def append_log(self, job_id: str, data: bytes) -> None:
        """Append output of the job to its stored log."""
        ...

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """The job's log from byte ``offset`` on (empty when there is nothing more)."""
        ...

    def log_size(self, job_id: str) -> int:
        """How many bytes the job's stored log holds (0 when it has none)."""
        ...


def open_job_store(redis_url: str | None, directory: Path) -> JobStore:
    """The gateway's job store: in Redis at ``redis_url`` (its ``?prefix=`` query names the
    keys' prefix, default ``nbcluster/jobs/``) when given, else files under ``directory``."""
    if redis_url:
        from urllib.parse import parse_qs, urlsplit

        from ._redisstore import RedisJobStore

        parts = urlsplit(redis_url)
        prefix = parse_qs(parts.query).get("prefix", ["nbcluster/jobs/"])[-1]
        return RedisJobStore.from_url(parts._replace(query="").geturl(), prefix=prefix)
    from ._filestore import FileJobStore

    return FileJobStore(directory)
