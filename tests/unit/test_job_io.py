"""The job store's calls run on one worker thread, in order, and never on the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from nbcluster.gateway._job_io import JobStoreIO
from nbcluster.jobs import FileJobStore, Job, JobSpec


class SlowStore(FileJobStore):
    """Appends wait until released: the event loop must keep running meanwhile."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()
        self.threads: set[str] = set()

    def append_log(self, job_id: str, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        assert self.release.wait(10)
        super().append_log(job_id, data)


async def test_a_slow_store_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    store = SlowStore(tmp_path)
    io = JobStoreIO(store)
    job = Job(spec=JobSpec(command=["true"]))
    await io.save(job)
    appending = asyncio.ensure_future(io.append_log(job.id, b"first\n"))
    # The loop keeps turning while the append waits in its thread.
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks == 20 and not appending.done()
    # A read queued behind the append sees it: one thread keeps the store's order.
    reading = asyncio.ensure_future(io.read_log(job.id, 0))
    await asyncio.sleep(0.01)
    assert not reading.done()
    store.release.set()
    await appending
    assert await reading == b"first\n"
    assert store.threads and threading.main_thread().name not in store.threads
    io.close()


async def test_saves_land_in_the_order_the_job_changed(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path)
    io = JobStoreIO(store)
    job = Job(spec=JobSpec(command=["true"]))
    for status in ("running", "succeeded"):
        job.status = status  # type: ignore[assignment]
        io.save_later(job)
    job.status = "failed"  # not saved: the queued copies are the job as it was
    await io.flush()
    saved = store.get(job.id)
    assert saved is not None and saved.status == "succeeded"
    io.close()
