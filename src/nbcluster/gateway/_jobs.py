"""The gateway's job manager: the CPU and GPU queues, assignment to workers (host daemons),
requeueing on a worker's death, retries, cancellation, logs and outputs.

The REST API (``_jobs_api``) calls :meth:`JobManager.submit` and friends; the host endpoint
hands it the workers' ``JobOutput``/``JobExited`` events and their hellos; the kernel manager's
host events tell it of lost workers. GPU jobs take their devices through the same scheduler as
kernel cells (``SchedulerDriver.reserve_job_gpus``, the scheduler's ``JobGpusRequested`` and
``JobGpusReleased`` events), so a GPU is never given to a job and a cell at once; while cells
wait for GPUs, GPU jobs wait (``jobs_yield_to_cells``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from .._tasks import BackgroundTasks
from ..hostproto import CancelJob, JobExited, JobOutput, StartJob
from ..jobs import Job, JobSpec, JobStore, WorkerCapacity, assign_jobs
from ._driver import SchedulerDriver
from ._errors import HostRequestError, HostUnreachable, JobError, NoSuchJob
from ._hosts import HostEntry, HostRegistry
from ._metrics import GatewayMetrics

__all__ = ["JobError", "JobManager", "NoSuchJob"]

log = logging.getLogger(__name__)

#: Output of a fast job (not stored) kept in memory, per job, at most.
_FAST_LOG_LIMIT = 1 * 2**20


@dataclass(slots=True)
class _Live:
    """What the manager keeps in memory about one job besides its record."""

    job: Job
    #: Subscribers of its events (status changes and output).
    watchers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    #: A fast job's output (it is not stored).
    output: bytearray = field(default_factory=bytearray)
    submitted_at: float = field(default_factory=time.monotonic)


class JobManager:
    def __init__(
        self,
        job_store: JobStore,
        hosts: HostRegistry,
        scheduling: SchedulerDriver,
        metrics: GatewayMetrics,
        object_store_url: str,
        yield_to_cells: bool = True,
    ) -> None:
        #: Where job records and logs are kept (files or Redis).
        self.job_store = job_store
        self.hosts = hosts
        self.scheduling = scheduling
        self.metrics = metrics
        #: The object store jobs read their inputs from and write their outputs to.
        self.object_store_url = object_store_url
        self.yield_to_cells = yield_to_cells
        self.jobs: dict[str, _Live] = {}
        self._background = BackgroundTasks("job manager", log)

    # -- start-up -----------------------------------------------------------------------------

    def restore(self) -> None:
        """Load stored jobs at start-up; running ones wait for their worker's hello."""
        for job in self.job_store.load_all():
            live = _Live(job)
            if job.terminal:
                live.done.set()
            self.jobs[job.id] = live
        if self.jobs:
            log.info("restored %d job(s)", len(self.jobs))

    # -- API ----------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Job:
        """Queue a job. A standard job is stored first and returned at once; a fast job (not
        stored) is returned when it has finished, with its result."""
        job = Job(spec=spec)
        live = _Live(job)
        self.jobs[job.id] = live
        if not spec.fast:
            self._save(job)
        self.metrics.jobs_submitted.labels(
            spec.queue_name, "fast" if spec.fast else "standard"
        ).inc()
        self._publish(live, {"type": "status", "status": "queued"})
        self.dispatch()
        if spec.fast:
            try:
                await asyncio.wait_for(live.done.wait(), spec.timeout + 30)
            finally:
                # Fast jobs are not durable: forget them once answered.
                self.jobs.pop(job.id, None)
        return job

    def get(self, job_id: str) -> Job:
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        return live.job

    def list_jobs(
        self, status: str | None = None, queue: str | None = None, owner: str | None = None
    ) -> list[Job]:
        found = [
            live.job
            for live in self.jobs.values()
            if (status is None or live.job.status == status)
            and (queue is None or live.job.spec.queue_name == queue)
            and (owner is None or live.job.spec.owner == owner)
        ]
        return sorted(found, key=lambda j: j.created)

    async def cancel(self, job_id: str) -> tuple[Job, str]:
        """Cancel a job; returns it and what happened (a finished job: a no-op that says so)."""
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        job = live.job
        if job.terminal:
            return job, f"job {job_id} already {job.status}; nothing to cancel"
        live.cancel_requested = True
        if job.status == "queued":
            self._finish(live, "cancelled", None, "cancelled before it started")
            return job, "cancelled before it started"
        assert job.worker is not None
        try:
            await self.hosts.session(job.worker).request(
                lambda rid: CancelJob(request_id=rid, job_id=job_id), timeout=30
            )
        except HostRequestError as exc:
            raise JobError(f"could not reach worker {job.worker} to cancel it: {exc}") from None
        return job, "cancellation requested; the job is stopping"

    def read_log(self, job_id: str, offset: int = 0) -> bytes:
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        if live.job.spec.fast:
            return bytes(live.output[offset:])
        return self.job_store.read_log(job_id, offset)

    async def follow(self, job_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """Events of a job (status changes, output) from now until it ends."""
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        live.watchers.add(queue)
        try:
            yield {"type": "status", "status": live.job.status}
            while not (live.job.terminal and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(live.done.wait())
                done, pending = await asyncio.wait(
                    {getter, waiter}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                if getter in done:
                    yield getter.result()
        finally:
            live.watchers.discard(queue)

    def workers(self) -> list[dict[str, Any]]:
        """Worker health: a worker is healthy while it heartbeats (its record expires after
        the host-lost timeout of silence)."""
        now = time.monotonic()
        running = Counter(
            live.job.worker for live in self.jobs.values() if live.job.status == "running"
        )
        return [
            {
                "name": h.name,
                "healthy": h.state == "connected",
                "state": h.state,
                "seconds_since_heartbeat": round(now - h.last_seen, 3),
                "running_jobs": running.get(h.name, 0),
                "cpus": h.resources.cpus,
                "memory_mb": h.resources.memory_mb,
                "gpus": len(h.resources.gpus),
            }
            for h in sorted(self.hosts.hosts.values(), key=lambda h: h.name)
        ]

    def statistics(self) -> dict[str, Any]:
        by_status = Counter(live.job.status for live in self.jobs.values())
        queued = Counter(
            live.job.spec.queue_name for live in self.jobs.values() if live.job.status == "queued"
        )
        return {
            "jobs": dict(by_status),
            "queued": {"cpu": queued.get("cpu", 0), "gpu": queued.get("gpu", 0)},
            "workers": {
                "healthy": sum(1 for h in self.hosts.hosts.values() if h.state == "connected"),
                "total": len(self.hosts.hosts),
            },
        }

    # -- assignment ---------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start every queued job that fits on a worker now."""
        queued = [live.job for live in self.jobs.values() if live.job.status == "queued"]
        if not queued:
            return
        workers = self._capacities()
        if not workers:
            return
        gpus_allowed = not (self.yield_to_cells and self.scheduling.waiting)
        for job, worker, devices in assign_jobs(queued, workers, gpus_allowed):
            live = self.jobs[job.id]
            if devices and not self.scheduling.reserve_job_gpus(job.id, worker, devices):
                continue
            job.status = "running"
            job.worker = worker
            job.attempts += 1
            job.started = time.time()
            job.exit_code = None
            job.error = ""
            self._save(job)
            self._publish(live, {"type": "status", "status": "running", "worker": worker})
            self._background.spawn(
                f"start job {live.job.id}", self._start_on(live, worker, devices)
            )

    def _capacities(self) -> list[WorkerCapacity]:
        views = self.scheduling.host_views()
        used_cpus: dict[str, float] = defaultdict(float)
        used_mem: dict[str, int] = defaultdict(int)
        for live in self.jobs.values():
            job = live.job
            if job.status == "running" and job.worker is not None:
                used_cpus[job.worker] += job.spec.resources.cpus
                used_mem[job.worker] += job.spec.resources.memory_mb
        capacities = []
        for host in self.hosts.connected():
            view = views.get(host.name)
            free = view.free_devices if view is not None and not view.draining else []
            capacities.append(
                WorkerCapacity(
                    host.name,
                    host.resources.cpus - used_cpus[host.name],
                    host.resources.memory_mb - used_mem[host.name],
                    free,
                )
            )
        return capacities

    def _release_gpus(self, job: Job) -> None:
        if job.spec.resources.gpus:
            self.scheduling.release_job_gpus(job.id)

    async def _start_on(self, live: _Live, worker: str, devices: tuple[int, ...]) -> None:
        job = live.job
        try:
            reply = await self.hosts.session(worker).request(
                lambda rid: StartJob(
                    request_id=rid,
                    job_id=job.id,
                    spec=job.spec.model_dump(mode="json"),
                    gpus=list(devices),
                    store_url=self.object_store_url,
                ),
                timeout=60,
            )
        except HostUnreachable:
            if job.status == "running" and job.worker == worker:
                self._requeue_or_fail(live, f"worker {worker} went away before it started")
            return
        except HostRequestError as exc:
            # The worker refused it (bad runtime, inputs missing ...) or did not answer in
            # time: no point retrying.
            if job.status == "running" and job.worker == worker:
                self._finish(live, "failed", None, f"could not start on {worker}: {exc}")
            return
        self.metrics.job_start_latency.labels("fast" if job.spec.fast else "standard").observe(
            time.monotonic() - live.submitted_at
        )
        if job.status == "running" and job.worker == worker:
            # When its process really started (the worker's clock: the same machine's, or
            # NTP-close), not when it was assigned.
            job.started = float(reply.get("started") or job.started or time.time())
            self._save(job)

    # -- worker events ------------------------------------------------------------------------

    def on_output(self, host: str, event: JobOutput) -> None:
        live = self.jobs.get(event.job_id)
        if live is None:
            return
        data = event.data.encode()
        if live.job.spec.fast:
            if len(live.output) < _FAST_LOG_LIMIT:
                live.output += data[: _FAST_LOG_LIMIT - len(live.output)]
        else:
            try:
                self.job_store.append_log(event.job_id, data)
            except Exception as exc:
                log.warning("could not store output of job %s: %s", event.job_id, exc)
        self._publish(live, {"type": "log", "data": event.data})

    def on_exited(self, host: str, event: JobExited) -> None:
        live = self.jobs.get(event.job_id)
        if live is None or live.job.terminal or live.job.worker != host:
            return  # a repeat, or a run this gateway already gave up on
        job = live.job
        job.log_tail = event.log_tail
        job.output_keys = dict(event.outputs)
        job.result = event.result
        if live.cancel_requested:
            self._finish(live, "cancelled", event.exit_code, event.error or "cancelled")
        elif event.exit_code == 0 and not event.error:
            self._finish(live, "succeeded", 0, "")
        else:
            why = event.error or f"exited with code {event.exit_code}"
            if job.attempts <= job.spec.retries:
                self._requeue(live, f"attempt {job.attempts} failed ({why}); retrying")
                job.exit_code = event.exit_code
            else:
                self._finish(live, "failed", event.exit_code, why)

    def on_worker_hello(self, entry: HostEntry, running: list[str]) -> None:
        """A worker (re)connected: jobs we think it runs but it does not were lost with its
        previous life."""
        still = set(running)
        for live in list(self.jobs.values()):
            job = live.job
            if job.status == "running" and job.worker == entry.name and job.id not in still:
                self._requeue_or_fail(live, f"worker {entry.name} restarted without it")
        self.dispatch()

    def on_worker_lost(self, name: str) -> None:
        """A worker stopped heartbeating (its health record expired): its jobs run again."""
        for live in list(self.jobs.values()):
            if live.job.status == "running" and live.job.worker == name:
                self._requeue_or_fail(live, f"worker {name} was lost")
        self.dispatch()

    # -- bookkeeping --------------------------------------------------------------------------

    def _requeue_or_fail(self, live: _Live, why: str) -> None:
        job = live.job
        if job.attempts <= job.spec.retries:
            self._requeue(live, f"{why}; requeued (attempt {job.attempts + 1})")
        else:
            self._finish(live, "failed", None, f"{why}; no retries left")

    def _requeue(self, live: _Live, why: str) -> None:
        job = live.job
        self._release_gpus(job)
        job.status = "queued"
        job.worker = None
        job.error = why
        self._save(job)
        self.metrics.jobs_requeued.inc()
        log.info("job %s: %s", job.id, why)
        self._publish(live, {"type": "status", "status": "queued", "reason": why})
        self.dispatch()

    def _finish(self, live: _Live, status: str, exit_code: int | None, error: str) -> None:
        job = live.job
        self._release_gpus(job)
        job.status = status  # type: ignore[assignment]
        job.exit_code = exit_code
        job.error = error
        job.finished = time.time()
        self._save(job)
        self.metrics.jobs_finished.labels(status).inc()
        event: dict[str, Any] = {"type": "status", "status": status, "exit_code": exit_code}
        if error:
            event["error"] = error
        self._publish(live, event)
        live.done.set()
        self.dispatch()

    def _save(self, job: Job) -> None:
        if job.spec.fast:
            return
        try:
            self.job_store.save(job)
        except Exception:
            log.exception("could not save job %s", job.id)

    def _publish(self, live: _Live, event: dict[str, Any]) -> None:
        for queue in tuple(live.watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    async def close(self) -> None:
        await self._background.close()
