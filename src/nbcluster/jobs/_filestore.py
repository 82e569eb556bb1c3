"""The embedded job store: one JSON file per job in a directory, its log beside it.

The gateway's job manager is the only writer: it builds one :class:`FileJobStore` on its jobs
directory, calls :meth:`FileJobStore.save` at every state change of a job,
:meth:`FileJobStore.append_log` as output arrives, and :meth:`FileJobStore.load_all` once at
start-up, so that a restarted gateway finds every standard job where it left it. The API reads
logs back with :meth:`FileJobStore.read_log` (by offset, to follow a running job).

Layout of ``directory`` (created ``0700`` if missing):

* ``<id>.json``: the job (:class:`~nbcluster.jobs._model.Job` as JSON), mode ``0600``. Written
  to a temporary file in the same directory (``.<id>.<random>.tmp``), flushed to disk
  (``fsync``), then renamed over the old record (``os.replace``) and the directory synced: a
  reader (or a gateway restarted after a crash) sees the old record or the new one, never half.
* ``<id>.log``: the job's output, appended as it comes (not synced to disk at every append: a
  crash may lose the last output, never a job's state). Mode ``0600``.

Job ids name files, so they are checked before any path is built: ``[A-Za-z0-9_-]{1,64}``
(:func:`validate_job_id`, :class:`ValueError` otherwise).

Logs are capped at :data:`LOG_LIMIT` bytes (16 MiB) per job, so that a chatty job can neither
fill the disk nor make ``read_log`` return an unbounded answer: the append that would pass the
limit writes what fits, then :data:`TRUNCATED_NOTICE`; later appends are dropped. The Redis
store (:mod:`._redisstore`) keeps the same limit the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from ._model import Job

__all__ = [
    "LOG_LIMIT",
    "TRUNCATED_NOTICE",
    "FileJobStore",
    "JobStoreError",
    "truncated_notice",
    "validate_job_id",
]

log = logging.getLogger(__name__)

#: Bytes of output kept per job; the rest is dropped (see :data:`TRUNCATED_NOTICE`).
LOG_LIMIT = 16 * 2**20


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Temporary files of a save older than this (seconds) are left over from a crash.
_STALE_TEMP_AGE = 60.0


class JobStoreError(RuntimeError):
    """A job store cannot do what was asked: its backend is unreachable (the message names the
    Redis server), or a stored record is unreadable (the message names the file or key)."""


def validate_job_id(job_id: str) -> str:
    """``job_id`` if it may name a stored job (``[A-Za-z0-9_-]{1,64}``, e.g. a uuid hex);
    :class:`ValueError` otherwise. Both stores call it before touching files or keys."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: 1 to 64 characters among letters, digits, '_' and '-'"
        )
    return job_id


def truncated_notice(limit: int) -> bytes:
    """The line written once after the first ``limit`` bytes of a job's output."""
    size = f"{limit // 2**20} MiB" if limit and limit % 2**20 == 0 else f"{limit} bytes"
    return f"\n[nbcluster: output truncated at {size}; further output was dropped]\n".encode()


#: The notice for the default limit, :data:`LOG_LIMIT`.
TRUNCATED_NOTICE = truncated_notice(LOG_LIMIT)


def _capped(size: int, data: bytes, limit: int) -> bytes:
    """What to append to a log of ``size`` bytes so that it keeps at most ``limit`` bytes of
    output: all of ``data`` if it fits, else the part that fits and the truncation notice once
    (the log is then longer than ``limit``), nothing once the notice is there."""
    if size > limit or not data:
        return b""
    room = limit - size
    if len(data) <= room:
        return data
    return data[:room] + truncated_notice(limit)


def _check_offset(offset: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be 0 or more, got {offset}")


def parse_job_record(raw: bytes, job_id: str, where: str) -> Job:
    """The job in a stored record (both stores call it); :class:`JobStoreError` naming
    ``where`` (a file, or a key and its server) if it is unreadable or holds another job."""
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise JobStoreError(
            f"unreadable job record {where}: {exc.error_count()} error(s): {exc.errors()[0]['msg']}"
        ) from None
    if job.id != job_id:
        raise JobStoreError(f"job record {where} holds job {job.id!r}, not {job_id!r}")
    return job


class FileJobStore:
    """:class:`~nbcluster.jobs._store.JobStore` in a local directory (see the module docstring
    for the layout). Meant for one writer (the gateway's job manager); any number of readers,
    in this process or another, see whole records. File system errors (disk full, permissions)
    raise :class:`OSError` naming the path.
    """

    def __init__(self, directory: Path, log_limit: int = LOG_LIMIT) -> None:
        """Keep jobs in ``directory`` (created, ``0700``, if missing). ``log_limit``: bytes of
        output kept per job (tests lower it)."""
        if log_limit < 0:
            raise ValueError(f"log_limit must be 0 or more, got {log_limit}")
        self.directory = Path(directory)
        self.log_limit = log_limit
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _record(self, job_id: str) -> Path:
        return self.directory / f"{validate_job_id(job_id)}.json"

    def _log(self, job_id: str) -> Path:
        return self.directory / f"{validate_job_id(job_id)}.log"

    def save(self, job: Job) -> None:
        """Create or replace ``job``'s record atomically (temp file, fsync, rename, directory
        fsync): the job manager calls it at every state change."""
        path = self._record(job.id)
        data = job.model_dump_json().encode()
        # mkstemp creates the file with mode 0600.
        fd, temp = tempfile.mkstemp(prefix=f".{job.id}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._sync_directory()

    def _sync_directory(self) -> None:
        """Make the rename durable (where the platform allows opening a directory)."""
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. Windows
            return
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover - some file systems refuse
            pass
        finally:
            os.close(fd)

    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown. :class:`JobStoreError` naming the file if its record is
        unreadable; :class:`ValueError` for an invalid id."""
        path = self._record(job_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_job_record(raw, job_id, str(path))

    def load_all(self) -> list[Job]:
        """Every job, oldest first (by ``created``, then id): what the job manager calls at
        start-up. Unreadable or invalid records are skipped with a logged error naming the
        file; temporary files left by a crash during a save are removed."""
        jobs: list[Job] = []
        now = time.time()
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(".") and name.endswith(".tmp"):
                self._remove_stale(path, now)
                continue
            if not name.endswith(".json"):
                continue
            job_id = name[: -len(".json")]
            if not _JOB_ID.fullmatch(job_id):
                log.error("skipping job record %s: not a valid job id", path)
                continue
            try:
                jobs.append(parse_job_record(path.read_bytes(), job_id, str(path)))
            except (OSError, JobStoreError) as exc:
                log.error("skipping job record %s: %s", path, exc)
        jobs.sort(key=lambda job: (job.created, job.id))
        return jobs

    @staticmethod
    def _remove_stale(path: Path, now: float) -> None:
        try:
            if now - path.stat().st_mtime > _STALE_TEMP_AGE:
                path.unlink()
                log.info("removed %s, left over from an interrupted save", path)
        except OSError:
            pass

    def delete(self, job_id: str) -> None:
        """Forget the job and its log; no error if unknown."""
        record, output = self._record(job_id), self._log(job_id)
        record.unlink(missing_ok=True)
        output.unlink(missing_ok=True)
        self._sync_directory()

    def append_log(self, job_id: str, data: bytes) -> None:
        """Append ``data`` (output of the job) to its log, up to the cap (module docstring).
        The job manager calls it as output arrives from the worker."""
        path = self._log(job_id)
        if not data:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            chunk = _capped(os.fstat(fd).st_size, bytes(data), self.log_limit)
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)

    def log_size(self, job_id: str) -> int:
        """How many bytes the job's log holds (0 when it has none)."""
        try:
            return self._log(job_id).stat().st_size
        except FileNotFoundError:
            return 0

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """The job's log from byte ``offset`` on; empty when there is nothing more (or no log).
        At most the cap plus the notice, so bounded. The API calls it to show or follow logs."""
        _check_offset(offset)
        path = self._log(job_id)
        try:
            with path.open("rb") as source:
                source.seek(offset)
                return source.read()
        except FileNotFoundError:
            return b""
