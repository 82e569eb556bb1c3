"""A batch job's output as the gateway receives and keeps it, apart from the job manager's
bookkeeping: which part of a worker's ``JobOutput`` is new, how much of a fast job's output is
kept in memory, and the deletion of earlier attempts' output files.

The job manager (``_jobs``) calls :func:`unseen_output` for every output event of a job's
current run, :func:`keep_fast_output` for a fast job's (not stored), and
:func:`drop_earlier_attempts` in the background when a job that ran more than once ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..jobs import Job, job_prefix
from ..store import ObjectStore

__all__ = ["FAST_LOG_LIMIT", "drop_earlier_attempts", "keep_fast_output", "unseen_output"]

log = logging.getLogger(__name__)

#: Output of a fast job (not stored) kept in memory, per job, at most.
FAST_LOG_LIMIT = 1 * 2**20


def unseen_output(
    job_id: str, received: int, data: bytes, offset: int | None, end: int | None
) -> tuple[bytes, int]:
    """What of ``data`` the gateway does not have yet, and the bytes received after it.

    ``received``: bytes of the run's output received so far. ``offset``/``end``: where
    ``data`` stands in the run's output (``end`` defaults to ``offset + len(data)``); a worker
    that says nothing of offsets (``offset`` None) sends each byte once. Output sent again
    after a reconnect is skipped; a gap (output lost on the way) is logged and the data kept.
    """
    if offset is None:
        return data, received + len(data)
    end = end if end is not None else offset + len(data)
    if end <= received:
        return b"", received  # sent again after a reconnect, and already here
    if offset > received:
        log.warning(
            "job %s: output %d..%d arrived after only %d bytes; keeping it",
            job_id,
            offset,
            end,
            received,
        )
    elif offset < received:
        data = data[received - offset :]
    return data, end


def keep_fast_output(output: bytearray, data: bytes) -> None:
    """Append ``data`` to a fast job's in-memory output, up to :data:`FAST_LOG_LIMIT`."""
    if len(output) < FAST_LOG_LIMIT:
        output += data[: FAST_LOG_LIMIT - len(output)]


async def drop_earlier_attempts(object_store: Callable[[], ObjectStore], job: Job) -> None:
    """Delete the outputs of a job's runs other than its last: a failed or stale run's files,
    which nobody can download (the job's outputs are its last run's). A store that fails
    leaves them (logged); nothing else depends on it."""
    store = object_store()
    prefix = f"{job_prefix(job.id)}attempts/"
    keep = f"{prefix}{job.attempts}/"

    def drop() -> int:
        stale = [o.key for o in store.list(prefix) if not o.key.startswith(keep)]
        for key in stale:
            store.delete(key)
        return len(stale)

    try:
        dropped = await asyncio.to_thread(drop)
    except Exception as exc:  # the store is down: they stay, nothing else is affected
        log.warning("job %s: could not delete earlier attempts' outputs: %s", job.id, exc)
        return
    if dropped:
        log.info("job %s: deleted %d output(s) of earlier attempts", job.id, dropped)
