"""How the job manager answers a worker that could not start a job: by the class of the host
error (``HostUnreachable`` and friends), never by its message."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from nbcluster.gateway import HostRefused, HostRequestError, HostTimedOut, HostUnreachable
from nbcluster.gateway._jobs import JobManager, _Live
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.jobs import FileJobStore, Job, JobSpec


class _Session:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def request(self, build: Any, timeout: float) -> dict[str, Any]:
        raise self.error


class _Hosts:
    """A registry with no connected worker (nothing is dispatched again) whose session to
    ``w1`` fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.hosts: dict[str, Any] = {}
        self._session = _Session(error)

    def session(self, name: str) -> _Session:
        return self._session

    def connected(self) -> list[Any]:
        return []


class _Scheduling:
    waiting: list[Any] = []

    def host_views(self) -> dict[str, Any]:
        return {}

    def release_job_gpus(self, job_id: str) -> None:
        pass


def _manager(tmp_path: Path, error: Exception) -> JobManager:
    return JobManager(
        FileJobStore(tmp_path / "jobs"),
        _Hosts(error),  # type: ignore[arg-type]
        _Scheduling(),  # type: ignore[arg-type]
        GatewayMetrics(),
        "memory://",
    )


def _running(manager: JobManager, retries: int = 1) -> _Live:
    job = Job(spec=JobSpec(command=["true"], retries=retries))
    job.status = "running"
    job.worker = "w1"
    job.attempts = 1
    job.started = time.time()
    live = _Live(job)
    manager.jobs[job.id] = live
    return live


# A message that says "not connected" no longer decides anything: the class does.
@pytest.mark.parametrize(
    "error",
    [HostUnreachable("host w1 disconnected"), HostUnreachable("cannot send: socket closed")],
)
async def test_a_worker_that_went_away_gets_the_job_requeued(
    tmp_path: Path, error: Exception
) -> None:
    manager = _manager(tmp_path, error)
    live = _running(manager)
    await manager._start_on(live, "w1", ())
    assert live.job.status == "queued"
    assert live.job.worker is None
    assert "worker w1 went away before it started; requeued" in live.job.error


@pytest.mark.parametrize(
    "error",
    [
        HostRefused("no runtime named 'docker' here (not connected to a docker daemon)"),
        HostTimedOut("host w1 did not answer within 60 s"),
        HostRequestError("something else"),
    ],
)
async def test_a_worker_that_refused_or_did_not_answer_fails_the_job(
    tmp_path: Path, error: Exception
) -> None:
    manager = _manager(tmp_path, error)
    live = _running(manager)
    await manager._start_on(live, "w1", ())
    assert live.job.status == "failed"
    assert live.job.error == f"could not start on w1: {error}"


async def test_a_job_that_moved_on_meanwhile_is_left_alone(tmp_path: Path) -> None:
    manager = _manager(tmp_path, HostUnreachable("host w1 is not connected"))
    live = _running(manager)
    live.job.status = "cancelled"
    await manager._start_on(live, "w1", ())
    assert live.job.status == "cancelled"


class _Recording:
    """A worker session that answers every request and records its kind."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def request(self, build: Any, timeout: float) -> dict[str, Any]:
        self.sent.append(type(build("r1")).__name__)
        return {"started": time.time()}


async def test_a_job_cancelled_while_its_start_is_on_its_way_is_cancelled_once_started(
    tmp_path: Path,
) -> None:
    """The worker does not know the run before it answers the start: the cancellation waits
    for that answer instead of failing with "does not run here"."""
    manager = _manager(tmp_path, RuntimeError("unused"))
    session = _Recording()
    manager.hosts._session = session  # type: ignore[attr-defined]
    live = _running(manager)
    live.starting = True
    _, message = await manager.cancel(live.job.id)
    assert "as soon as it has started" in message and session.sent == []
    await manager._start_on(live, "w1", ())
    assert session.sent == ["StartJob", "CancelJob"]
    assert not live.starting
