"""The gateway's job manager: the CPU and GPU queues, assignment to workers (host daemons),
requeueing on a worker's death, retries, cancellation, logs and outputs.

The REST API (``_jobs_api``) calls :meth:`JobManager.submit` and friends; the host endpoint
hands it the workers' ``JobOutput``/``JobExited`` events and their hellos; the kernel manager's
host events tell it of lost workers. GPU jobs take their devices through the same scheduler as
kernel cells (``SchedulerDriver.reserve_job_gpus``, the scheduler's ``JobGpusRequested`` and
``JobGpusReleased`` events), so a GPU is never given to a job and a cell at once; while cells
wait for GPUs, GPU jobs wait (``jobs_yield_to_cells``).

Runs are fenced: every start of a job is a new attempt (``Job.attempts``), the worker tags the
run's output and end with it, and only the current attempt on the job's current worker is
heard (the rules: ``_job_fence``). Anything else (a run the gateway gave up on when its worker
was lost, a host speaking of a job it was never given) is dropped and counted, and the host is
told to stop that run. Output is acknowledged by offset, so that a worker resends after a
reconnect what the gateway may not have, and the gateway skips what it already has
(``_job_output``). The read-only views of jobs and workers are in ``_job_views``.

Over 500 lines, knowingly (about 540): what is left after those pure parts is one state
machine. The API's calls, the assignment to workers and the fenced event path all read and
change the same job records (``_Live``) and per-worker runs, and each ends in the same
transitions (``_requeue``, ``_finish``, ``dispatch``); split, each part would reach into the
others' state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from .._tasks import BackgroundTasks
from ..hostproto import CancelJob, JobExited, JobOutput, JobOutputAck, StartJob
from ..jobs import Job, JobSpec, JobStore, assign_jobs
from ..store import ObjectStore
from ._driver import SchedulerDriver
from ._errors import HostRequestError, HostUnreachable, JobError, NoSuchJob
from ._hosts import HostEntry, HostRegistry
from ._job_fence import Verdict, is_current_run, refusal_reason
from ._job_io import JobStoreIO
from ._job_output import drop_earlier_attempts, keep_fast_output, unseen_output
from ._job_views import job_statistics, matching_jobs, worker_capacities, worker_health
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._subscribers import Subscription

__all__ = ["JobError", "JobManager", "NoSuchJob", "Verdict"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """What the manager keeps in memory about one job besides its record."""

    job: Job
    #: Subscribers of its events (status changes and output).
    watchers: set[Subscription] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    #: A fast job's output (it is not stored).
    output: bytearray = field(default_factory=bytearray)
    submitted_at: float = field(default_factory=time.monotonic)
    #: Bytes of the current attempt's output received (None: not known yet, after a restart).
    received: int | None = None
    #: Its ``StartJob`` is on its way to the worker (not answered yet).
    starting: bool = False


class JobManager:
    """Created by the gateway app (``_app``); :meth:`restore` loads the stored jobs when the
    gateway starts, :meth:`close` runs at shutdown. Runs on the gateway's loop."""

    def __init__(
        self,
        job_store: JobStore,
        hosts: HostRegistry,
        scheduling: SchedulerDriver,
        metrics: GatewayMetrics,
        object_store_url: str,
        yield_to_cells: bool = True,
        subscriber_buffer: int = 4 * 2**20,
        object_store: Callable[[], ObjectStore] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.notifier = notifier if notifier is not None else Notifier()
        #: Where job records and logs are kept (files or Redis); every call but the start-up
        #: load goes through ``io`` (one worker thread, in order).
        self.job_store = job_store
        self.io = JobStoreIO(job_store)
        self.hosts = hosts
        self.scheduling = scheduling
        self.metrics = metrics
        #: The object store jobs read their inputs from and write their outputs to.
        self.object_store_url = object_store_url
        self.yield_to_cells = yield_to_cells
        #: Bytes of events one subscriber may have buffered before it is dropped.
        self.subscriber_buffer = subscriber_buffer
        #: Where the outputs of earlier attempts are deleted when a job ends (None: kept).
        self._object_store = object_store
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
            # Stored before it is queued and answered: a job the API accepted survives a
            # gateway restart.
            await self.io.save(job)
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
        self,
        status: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        kernel_id: str | None = None,
    ) -> list[Job]:
        jobs = (live.job for live in self.jobs.values())
        return matching_jobs(jobs, status, queue, owner, kernel_id)

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
        if live.starting:
            # The worker does not know the run yet: it is cancelled once it says it started
            # (``_start_on``).
            return job, "cancellation requested; the job stops as soon as it has started"
        await self._cancel_run(live)
        return job, "cancellation requested; the job is stopping"

    async def _cancel_run(self, live: _Live) -> None:
        job = live.job
        assert job.worker is not None
        job_id, attempt = job.id, job.attempts or None
        try:
            await self.hosts.session(job.worker).request(
                lambda rid: CancelJob(request_id=rid, job_id=job_id, attempt=attempt), timeout=30
            )
        except HostRequestError as exc:
            raise JobError(f"could not reach worker {job.worker} to cancel it: {exc}") from None

    async def read_log(self, job_id: str, offset: int = 0) -> bytes:
        """The job's output from ``offset``: every chunk stored before this call included."""
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        if live.job.spec.fast:
            return bytes(live.output[offset:])
        return await self.io.read_log(job_id, offset)

    def subscribe(self, job_id: str) -> Subscription:
        """A new subscriber of a job's events, its buffer starting with the job's status;
        read it with :meth:`follow`. Past ``subscriber_buffer`` bytes behind it is dropped
        (its ``dropped`` event is set)."""
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        subscriber = Subscription(self.subscriber_buffer)
        subscriber.offer({"type": "status", "status": live.job.status})
        live.watchers.add(subscriber)
        return subscriber

    async def follow(
        self, job_id: str, subscriber: Subscription | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Events of a job (status changes, output) from now until it ends, or until the
        subscriber is dropped for falling behind (``subscriber.dropped``)."""
        live = self.jobs.get(job_id)
        if live is None:
            raise NoSuchJob(f"no job with id {job_id}")
        if subscriber is None:
            subscriber = self.subscribe(job_id)
        try:
            while not (live.job.terminal and subscriber.empty()):
                event = await subscriber.next(live.done)
                if event is None:  # dropped, or the job ended with nothing left to read
                    return
                yield event
        finally:
            live.watchers.discard(subscriber)

    def workers(self) -> list[dict[str, Any]]:
        """Worker health (``_job_views.worker_health``)."""
        return worker_health(self.hosts, (live.job for live in self.jobs.values()))

    def statistics(self) -> dict[str, Any]:
        return job_statistics(self.hosts, (live.job for live in self.jobs.values()))

    # -- assignment ---------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start every queued job that fits on a worker now."""
        queued = [live.job for live in self.jobs.values() if live.job.status == "queued"]
        if not queued:
            return
        workers = worker_capacities(
            self.hosts, self.scheduling.host_views(), (live.job for live in self.jobs.values())
        )
        if not workers:
            return
        gpus_allowed = not (self.yield_to_cells and self.scheduling.waiting)
        for job, worker, devices in assign_jobs(queued, workers, gpus_allowed):
            live = self.jobs[job.id]
            if devices and not self.scheduling.reserve_job_gpus(
                job.id, worker, devices, job.spec.owner
            ):
                continue
            job.status = "running"
            job.worker = worker
            job.attempts += 1
            job.started = time.time()
            job.exit_code = None
            job.error = ""
            live.received = 0
            live.starting = True
            self._save(job)
            self._publish(live, {"type": "status", "status": "running", "worker": worker})
            self._background.spawn(
                f"start job {live.job.id}", self._start_on(live, worker, devices, job.attempts)
            )

    def _release_gpus(self, job: Job) -> None:
        if job.spec.resources.gpus:
            self.scheduling.release_job_gpus(job.id)

    async def _start_on(
        self, live: _Live, worker: str, devices: tuple[int, ...], attempt: int | None = None
    ) -> None:
        job = live.job
        if attempt is None:
            attempt = job.attempts
        # The new attempt's output follows what the log holds now (measured before the run
        # is started, so none of its output is in it yet).
        job.log_base = await self._log_size(live)
        if job.status != "running" or job.worker != worker or job.attempts != attempt:
            live.starting = False
            return  # requeued meanwhile
        try:
            reply = await self.hosts.session(worker).request(
                lambda rid: StartJob(
                    request_id=rid,
                    job_id=job.id,
                    spec=job.spec.model_dump(mode="json"),
                    gpus=list(devices),
                    store_url=self.object_store_url,
                    attempt=attempt,
                ),
                timeout=60,
            )
        except HostUnreachable:
            live.starting = False
            if job.status == "running" and job.worker == worker:
                self._requeue_or_fail(live, f"worker {worker} went away before it started")
            return
        except HostRequestError as exc:
            live.starting = False
            # The worker refused it (bad runtime, inputs missing ...) or did not answer in
            # time: no point retrying.
            if job.status == "running" and job.worker == worker:
                self._finish(live, "failed", None, f"could not start on {worker}: {exc}")
            return
        self.metrics.job_start_latency.labels("fast" if job.spec.fast else "standard").observe(
            time.monotonic() - live.submitted_at
        )
        live.starting = False
        if job.status == "running" and job.worker == worker:
            # When its process really started (the worker's clock: the same machine's, or
            # NTP-close), not when it was assigned.
            job.started = float(reply.get("started") or job.started or time.time())
            self._save(job)
            if live.cancel_requested:
                # Cancelled while its start was on its way: the worker knows it now.
                try:
                    await self._cancel_run(live)
                except JobError as exc:
                    log.warning("job %s: %s", job.id, exc)

    # -- worker events ------------------------------------------------------------------------

    def _current(self, host: str, job_id: str, attempt: int) -> _Live | None:
        """The job, if ``attempt`` on ``host`` is its current run (attempt 0: a host that does
        not say, taken as the current one); else None."""
        live = self.jobs.get(job_id)
        if live is None or not is_current_run(live.job, host, attempt):
            return None
        return live

    def _refuse(self, host: str, kind: str, job_id: str, attempt: int) -> Verdict:
        live = self.jobs.get(job_id)
        reason = refusal_reason(live.job if live is not None else None, host, attempt)
        self.metrics.host_events_refused.labels(reason).inc()
        log.warning(
            "dropped %s of job %s attempt %s from host %s (%s: the job's current run is "
            "attempt %s on %s)",
            kind,
            job_id,
            attempt or "?",
            host,
            reason,
            live.job.attempts if live is not None else "-",
            (live.job.worker or "no host") if live is not None else "-",
        )
        return Verdict(stop=(job_id, attempt or None))

    async def _log_size(self, live: _Live) -> int:
        if live.job.spec.fast:
            return len(live.output)
        try:
            return await self.io.log_size(live.job.id)
        except Exception as exc:
            log.warning("could not measure the log of job %s: %s", live.job.id, exc)
            return live.job.log_base

    async def on_output(self, host: str, event: JobOutput) -> Verdict:
        """Output of a run. Called by the host endpoint, one event of a host at a time; the
        acknowledgement is sent once the output is stored."""
        live = self._current(host, event.job_id, event.attempt)
        if live is None:
            return self._refuse(host, "output", event.job_id, event.attempt)
        job = live.job
        if live.received is None:
            live.received = max(0, await self._log_size(live) - job.log_base)
        data, live.received = unseen_output(
            job.id, live.received, event.data.encode(), event.offset, event.end
        )
        if not data:  # nothing new (sent again after a reconnect), or empty
            return Verdict(ack=self._ack(job, live.received))
        if job.spec.fast:
            keep_fast_output(live.output, data)
        else:
            try:
                await self.io.append_log(event.job_id, data)
            except Exception as exc:
                log.warning("could not store output of job %s: %s", event.job_id, exc)
        self._publish(live, {"type": "log", "data": data.decode("utf-8", "replace")})
        return Verdict(ack=self._ack(job, live.received) if event.offset is not None else None)

    @staticmethod
    def _ack(job: Job, offset: int, exited: bool = False) -> JobOutputAck:
        return JobOutputAck(job_id=job.id, attempt=job.attempts, offset=offset, exited=exited)

    async def on_exited(self, host: str, event: JobExited) -> Verdict:
        """A run ended. Acknowledged once its new state is stored (the host forgets the run
        then)."""
        verdict = self._exited(host, event)
        if verdict.ack is not None:
            await self.io.flush()
        return verdict

    def _exited(self, host: str, event: JobExited) -> Verdict:
        live = self.jobs.get(event.job_id)
        if (
            live is not None
            and live.job.terminal
            and live.job.worker == host
            and event.attempt in (0, live.job.attempts)
        ):
            # A repeat (its acknowledgement was lost): acknowledged again.
            return Verdict(ack=self._ack(live.job, live.received or 0, exited=True))
        live = self._current(host, event.job_id, event.attempt)
        if live is None:
            return self._refuse(host, "end", event.job_id, event.attempt)
        job = live.job
        ack = self._ack(job, live.received or 0, exited=True)
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
        return Verdict(ack=ack)

    def on_worker_hello(
        self, entry: HostEntry, running: list[str], attempts: dict[str, int] | None = None
    ) -> list[tuple[str, int | None]]:
        """A worker (re)connected. Jobs we think it runs but it does not were lost with its
        previous life (they run again); runs it has that are not the jobs' current attempt
        there are stale: returned (job id, attempt), for the caller to stop them."""
        attempts = attempts or {}
        mine: set[str] = set()
        stale: list[tuple[str, int | None]] = []
        for job_id in running:
            attempt = attempts.get(job_id, 0)
            if self._current(entry.name, job_id, attempt) is not None:
                mine.add(job_id)
            else:
                self._refuse(entry.name, "run", job_id, attempt)
                stale.append((job_id, attempt or None))
        for live in list(self.jobs.values()):
            job = live.job
            if job.status == "running" and job.worker == entry.name and job.id not in mine:
                self._requeue_or_fail(live, f"worker {entry.name} restarted without it")
        self.dispatch()
        return stale

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
        self.notifier.notify(
            "job_requeued",
            "warning",
            f"job/{job.id}",
            f"job {job.id}: {why}",
            owner=job.spec.owner,
            logger=log,
        )
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
        if self._object_store is not None and job.attempts > 1:
            self._background.spawn(
                f"drop earlier attempts of job {job.id}",
                drop_earlier_attempts(self._object_store, job),
            )
        self.metrics.jobs_finished.labels(status).inc()
        if status == "failed":
            self.notifier.notify(
                "job_failed",
                "error",
                f"job/{job.id}",
                f"job {job.id} failed"
                + (f" with exit code {exit_code}" if exit_code is not None else "")
                + (f": {error}" if error else ""),
                owner=job.spec.owner,
                logger=log,
            )
        event: dict[str, Any] = {"type": "status", "status": status, "exit_code": exit_code}
        if error:
            event["error"] = error
        self._publish(live, event)
        live.done.set()
        self.dispatch()

    def _save(self, job: Job) -> None:
        if not job.spec.fast:
            self.io.save_later(job)

    def _publish(self, live: _Live, event: dict[str, Any]) -> None:
        for subscriber in tuple(live.watchers):
            if not subscriber.offer(event):
                # It stopped reading: drop it rather than buffer without end.
                live.watchers.discard(subscriber)
                self.metrics.job_subscribers_dropped.inc()
                log.warning(
                    "job %s: dropped a subscriber %d bytes behind (subscriber buffer limit)",
                    live.job.id,
                    subscriber.limit,
                )

    async def close(self) -> None:
        await self._background.close()
        # The last saves land before the gateway exits.
        await asyncio.to_thread(self.io.close)
