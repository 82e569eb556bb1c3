"""The job store's I/O, off the event loop and in order.

Every call to the job store (files or Redis) runs on one worker thread: a slow disk or Redis
stalls no request and no host's heartbeat, and one thread keeps the store's order — a log read
sees every append queued before it, a job's records are saved in the order they changed.
Record saves are queued without waiting (the job in memory is the truth while the gateway
runs); output appends are awaited, because a host is told its output is stored (the
acknowledged offset) only once it is."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..jobs import Job, JobStore

__all__ = ["JobStoreIO"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobStoreIO:
    """Owned by the job manager; ``store`` is the job store it serialises calls to."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._thread.submit(call))

    def save_later(self, job: Job) -> Future[None]:
        """Queue a save of the job as it is now (a copy: later changes are later saves)."""
        snapshot = job.model_copy(deep=True)

        def save() -> None:
            try:
                self.store.save(snapshot)
            except Exception:
                log.exception("could not save job %s", snapshot.id)

        return self._thread.submit(save)

    async def save(self, job: Job) -> None:
        """Save and wait for it (a submitted job is stored before the API answers)."""
        await asyncio.wrap_future(self.save_later(job))

    async def append_log(self, job_id: str, data: bytes) -> None:
        await self._run(lambda: self.store.append_log(job_id, data))

    async def read_log(self, job_id: str, offset: int) -> bytes:
        return await self._run(lambda: self.store.read_log(job_id, offset))

    async def log_size(self, job_id: str) -> int:
        return await self._run(lambda: self.store.log_size(job_id))

    async def flush(self) -> None:
        """Returns once everything queued before it is done."""
        await self._run(lambda: None)

    def close(self) -> None:
        """Finish what is queued (the last saves), then stop the thread."""
        self._thread.shutdown(wait=True)
