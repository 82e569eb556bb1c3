"""Job runs are fenced by attempt, and output is acknowledged by offset: resent output is
skipped, a stale or foreign run's events are refused and change nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nbcluster.gateway._jobs import JobManager
from nbcluster.host._jobs import _complete_utf8
from nbcluster.hostproto import (
    JobExited,
    JobOutput,
    JobOutputAck,
    decode_gateway_message,
    encode,
)
from nbcluster.store import InMemoryStore

from .test_job_start_errors import _manager, _running


def _fenced(tmp_path: Path) -> tuple[JobManager, str]:
    manager = _manager(tmp_path, RuntimeError("unused"))
    live = _running(manager)
    live.received = 0
    return manager, live.job.id


async def test_resent_output_is_skipped_and_acknowledged(tmp_path: Path) -> None:
    manager, jid = _fenced(tmp_path)
    first = await manager.on_output(
        "w1", JobOutput(job_id=jid, attempt=1, data="a\nb\n", offset=0, end=4)
    )
    assert first.ack == JobOutputAck(job_id=jid, attempt=1, offset=4)
    # After a reconnect the worker sends again from its last acknowledged offset (0).
    again = await manager.on_output(
        "w1", JobOutput(job_id=jid, attempt=1, data="a\nb\nc\n", offset=0, end=6)
    )
    assert again.ack is not None and again.ack.offset == 6
    same = await manager.on_output(
        "w1", JobOutput(job_id=jid, attempt=1, data="c\n", offset=4, end=6)
    )
    assert same.ack is not None and same.ack.offset == 6
    assert await manager.read_log(jid) == b"a\nb\nc\n"


async def test_stale_and_foreign_events_are_refused(tmp_path: Path) -> None:
    manager, jid = _fenced(tmp_path)
    manager.jobs[jid].job.attempts = 2
    stale = await manager.on_output("w1", JobOutput(job_id=jid, attempt=1, data="old\n", offset=0))
    assert stale.ack is None and stale.stop == (jid, 1)
    foreign = await manager.on_exited("w2", JobExited(job_id=jid, attempt=2, exit_code=0))
    assert foreign.stop == (jid, 2)
    assert manager.jobs[jid].job.status == "running"
    assert await manager.read_log(jid) == b""
    refused = manager.metrics.host_events_refused
    assert refused.labels("stale")._value.get() == 1
    assert refused.labels("foreign")._value.get() == 1
    ended = await manager.on_exited("w1", JobExited(job_id=jid, attempt=2, exit_code=0))
    assert ended.ack is not None and ended.ack.exited
    assert manager.jobs[jid].job.status == "succeeded"


def test_a_reconnecting_worker_is_told_its_stale_runs(tmp_path: Path) -> None:
    manager, jid = _fenced(tmp_path)

    class Entry:
        name = "w1"

    assert manager.on_worker_hello(Entry(), [jid], {jid: 1}) == []  # type: ignore[arg-type]
    manager.jobs[jid].job.attempts = 2
    assert manager.on_worker_hello(Entry(), [jid], {jid: 1}) == [(jid, 1)]  # type: ignore[arg-type]


def test_ack_round_trips_and_utf8_is_never_cut() -> None:
    ack = JobOutputAck(job_id="j", attempt=3, offset=10, exited=True)
    assert decode_gateway_message(encode(ack)) == ack
    text = "é€😀".encode()
    for cut in range(len(text) + 1):
        kept = _complete_utf8(text[:cut])
        kept.decode("utf-8")  # never a partial character
        assert text.startswith(kept) and cut - len(kept) < 4


async def test_a_finished_jobs_earlier_attempts_outputs_are_deleted(tmp_path: Path) -> None:
    """Only the last run's outputs can be downloaded: a failed run's files go."""
    store = InMemoryStore()
    manager, jid = _fenced(tmp_path)
    manager._object_store = lambda: store
    for key in (
        f"jobs/{jid}/attempts/1/model.pt",
        f"jobs/{jid}/attempts/2/model.pt",
        f"jobs/{jid}/attempts/2/sub/log.txt",
        "jobs/other/attempts/1/model.pt",
    ):
        store.put(key, b"x")
    manager.jobs[jid].job.attempts = 2
    ended = await manager.on_exited("w1", JobExited(job_id=jid, attempt=2, exit_code=0))
    assert ended.ack is not None
    # The deletion runs in the background, off the event loop.
    deadline = asyncio.get_running_loop().time() + 10
    while any(o.key.endswith("attempts/1/model.pt") for o in store.list(f"jobs/{jid}/")):
        assert asyncio.get_running_loop().time() < deadline, "earlier attempt not deleted"
        await asyncio.sleep(0.01)
    assert sorted(o.key for o in store.list("jobs/")) == [
        f"jobs/{jid}/attempts/2/model.pt",
        f"jobs/{jid}/attempts/2/sub/log.txt",
        "jobs/other/attempts/1/model.pt",
    ]
