"""A host daemon as a batch-job worker: runs the jobs the gateway assigns it, streams their
output back, collects their outputs into the object store and reports their end.

Owned by :class:`~._daemon.HostDaemon`, which hands it ``StartJob``/``CancelJob`` requests and
the gateway's ``JobOutputAck`` messages, and gives it a function that sends events to the gateway.

Every run is one *attempt* of its job (``StartJob.attempt``): its output, end and stored outputs
carry the attempt, so that the gateway can drop those of a run that is no longer the job's.
Output is sent from the last offset the gateway acknowledged: after a reconnect, whatever was
sent but not acknowledged is sent again (the gateway skips what it already has), so no output
is lost and none is doubled. A job's end is kept, with its log, until the gateway acknowledged
it; the hello after a reconnect lists such jobs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import envvars
from .._tasks import BackgroundTasks
from ..hostproto import CancelJob, JobExited, JobOutput, JobOutputAck, StartJob
from ..jobs import JobHandle, JobRuntime, JobSpec, ProcessRuntime, optional_runtimes

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

#: Output is sent to the gateway at most this often, in pieces of at most this many bytes.
_FLUSH_INTERVAL = 0.1
_CHUNK = 64 * 1024
#: What a fast job returns as its result, at most.
_RESULT_LIMIT = 1 * 2**20
#: Environment variables of the daemon that a job must not see.
_PRIVATE_ENV = frozenset(v.name for v in envvars.ALL if v.secret)

#: Sends an event to the gateway; False when it could not (disconnected).
Send = Callable[[JobOutput | JobExited], Awaitable[bool]]


class _RunningJob:
    def __init__(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        workdir: Path,
        handle: JobHandle,
        log_path: Path,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.spec = spec
        self.workdir = workdir
        self.handle = handle
        self.log_path = log_path
        self.cancelled = False
        #: Stopped because the run is no longer the job's: nothing of it is reported.
        self.stale = False
        self.task: asyncio.Task[None] | None = None
        #: Output the gateway acknowledged, and output sent on the current connection.
        self.acked = 0
        self.sent = 0
        #: One flush (or delivery of the end) at a time.
        self.lock = asyncio.Lock()
        #: Its end, once it ended, until the gateway acknowledged it.
        self.exited: JobExited | None = None


def _complete_utf8(chunk: bytes) -> bytes:
    """``chunk`` without a multi-byte UTF-8 character cut at its end (sent with the next)."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        if byte < 0x80:
            return chunk
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
        return chunk if need <= back else chunk[:-back]
    return chunk


class JobRunner:
    def __init__(self, jobs_dir: Path, send: Send) -> None:
        self.jobs_dir = jobs_dir
        self._send = send
        self.runtimes: dict[str, JobRuntime] = {"process": ProcessRuntime()}
        self._add_optional_runtimes()
        self.running: dict[str, _RunningJob] = {}
        #: Jobs that ended and whose end the gateway has not acknowledged yet.
        self.finished: dict[str, _RunningJob] = {}
        #: Counts connections: a send on an earlier one does not advance what was sent.
        self._generation = 0
        self._tasks = BackgroundTasks("job runner", log)

    def _add_optional_runtimes(self) -> None:
        """Container and Kubernetes runtimes, when their modules are there; their clients
        connect only when a job needs them."""
        self.runtimes.update(optional_runtimes())

    def job_ids(self) -> list[str]:
        """Jobs that run here, or ended here without the gateway knowing it yet."""
        return sorted({*self.running, *self.finished})

    def job_attempts(self) -> dict[str, int]:
        return {
            job.job_id: job.attempt for job in (*self.finished.values(), *self.running.values())
        }

    async def start(self, request: StartJob) -> dict[str, Any]:
        """Prepare the job's directory and inputs, start it; returns once it runs."""
        existing = self.running.get(request.job_id)
        if existing is not None:
            if not (existing.attempt and request.attempt > existing.attempt):
                raise ValueError(f"job {request.job_id} already runs here")
            # An older run of the job is stale now: it stops before the new one starts.
            await self._stop_stale(existing, 2.0)
        old = self.finished.pop(request.job_id, None)
        if old is not None:
            log.info("job %s: dropping the end of its attempt %d", old.job_id, old.attempt)
        try:
            spec = JobSpec.model_validate(request.spec)
        except ValidationError as exc:
            raise ValueError(f"invalid job spec: {exc.errors()[0]['msg']}") from None
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            raise ValueError(f"runtime: {spec.runtime!r} is not available on this host")
        runtime.check(spec)
        workdir = self.jobs_dir / request.job_id
        shutil.rmtree(workdir, ignore_errors=True)  # a retried job starts clean
        workdir.mkdir(parents=True)
        await asyncio.to_thread(self._write_inputs, spec, workdir, request.store_url)
        env = self._env(request, spec)
        log_path = workdir / "output.log"
        handle = await runtime.start(request.job_id, spec, workdir, env, log_path)
        job = _RunningJob(request.job_id, request.attempt, spec, workdir, handle, log_path)
        self.running[request.job_id] = job
        job.task = asyncio.create_task(self._supervise(job, request.store_url))
        return {"started": time.time()}

    @staticmethod
    def _write_inputs(spec: JobSpec, workdir: Path, object_store_url: str | None) -> None:
        for name, text in spec.inline_inputs.items():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        if spec.inputs:
            if object_store_url is None:
                raise ValueError("inputs: this job names store inputs but no store was given")
            from ..store import open_store

            object_store = open_store(object_store_url)
            for name, key in spec.inputs.items():
                target = workdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(object_store.get(key))

    @staticmethod
    def _env(request: StartJob, spec: JobSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env.update(spec.env)
        visible = ",".join(map(str, request.gpus))
        env |= {
            envvars.JOB_ID.name: request.job_id,
            envvars.GPUS.name: visible,
            # A job without GPUs sees none, so that it cannot take one a cell was given.
            envvars.CUDA_VISIBLE_DEVICES.name: visible,
            "PYTHONUNBUFFERED": "1",
        }
        return env

    async def cancel(self, request: CancelJob) -> dict[str, Any]:
        job = self.running.get(request.job_id)
        if job is None:
            ended = self.finished.get(request.job_id)
            if ended is not None and request.stale and request.attempt in (None, ended.attempt):
                # It ended, but its end is no longer wanted: forget it.
                self._forget(ended)
                return {}
            raise LookupError(f"job {request.job_id} does not run here")
        if request.attempt is not None and request.attempt != job.attempt:
            raise LookupError(
                f"job {request.job_id} runs here as attempt {job.attempt}, not {request.attempt}"
            )
        if request.stale:
            log.warning(
                "job %s: attempt %d is no longer the job's; stopping it", job.job_id, job.attempt
            )
            await self._stop_stale(job, request.grace)
            return {}
        job.cancelled = True
        await job.handle.cancel(request.grace)
        return {}

    async def _stop_stale(self, job: _RunningJob, grace: float) -> None:
        job.cancelled = job.stale = True
        with contextlib.suppress(Exception):
            await job.handle.cancel(grace)
        if job.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(job.task), grace + 10)

    async def _supervise(self, job: _RunningJob, object_store_url: str | None) -> None:
        streamer = asyncio.create_task(self._stream_output(job))
        error = ""
        code: int | None
        try:
            code = await asyncio.wait_for(job.handle.wait(), job.spec.timeout)
        except TimeoutError:
            await job.handle.cancel()
            code = await job.handle.wait()
            error = f"timed out after {job.spec.timeout:g} s"
        finally:
            await asyncio.sleep(_FLUSH_INTERVAL)
            streamer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streamer
        if job.stale:
            self._forget(job)
            return
        if job.cancelled and not error:
            error = "cancelled"
        outputs: dict[str, str] = {}
        try:
            outputs = await asyncio.to_thread(self._collect_outputs, job, object_store_url)
        except Exception as exc:  # the store: the job's end is reported all the same
            error = error or f"could not store its outputs: {exc}"
        tail = _tail(job.log_path, 4096)
        result = _tail(job.log_path, _RESULT_LIMIT) if job.spec.fast else None
        job.exited = JobExited(
            job_id=job.job_id,
            attempt=job.attempt,
            exit_code=code,
            error=error,
            log_tail=tail,
            outputs=outputs,
            result=result,
        )
        if self.running.get(job.job_id) is job:
            del self.running[job.job_id]
        if job.stale:
            self._forget(job)
            return
        self.finished[job.job_id] = job
        await self._deliver_end(job)

    async def _deliver_end(self, job: _RunningJob) -> None:
        """Send the rest of the output, then the end (kept until acknowledged)."""
        async with job.lock:
            if job.exited is None or self.finished.get(job.job_id) is not job:
                return
            if await self._flush_locked(job, final=True):
                await self._send(job.exited)

    def _forget(self, job: _RunningJob) -> None:
        if self.finished.get(job.job_id) is job:
            del self.finished[job.job_id]
        if self.running.get(job.job_id) is job:
            del self.running[job.job_id]
        if not any(j.workdir == job.workdir for j in (*self.running.values(),)):
            shutil.rmtree(job.workdir, ignore_errors=True)

    @staticmethod
    def _collect_outputs(job: _RunningJob, object_store_url: str | None) -> dict[str, str]:
        found = [n for n in job.spec.outputs if (job.workdir / n).is_file()]
        if not found:
            return {}
        if object_store_url is None:
            raise ValueError("no object store was given for its outputs")
        from ..store import open_store

        object_store = open_store(object_store_url)
        # Each attempt has its own keys: a stale run can never overwrite the current one's.
        base = f"jobs/{job.job_id}/attempts/{job.attempt}" if job.attempt else f"jobs/{job.job_id}"
        keys = {}
        for name in found:
            key = f"{base}/outputs/{name}"
            object_store.put(key, (job.workdir / name).read_bytes())
            keys[name] = key
        return keys

    async def _stream_output(self, job: _RunningJob) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            async with job.lock:
                await self._flush_locked(job)

    async def _flush_locked(self, job: _RunningJob, final: bool = False) -> bool:
        """Send the job's output after what was sent on this connection; False when it could
        not all be sent (disconnected: it is sent again, from the acknowledged offset)."""
        generation = self._generation
        try:
            with job.log_path.open("rb") as f:
                while True:
                    f.seek(job.sent)
                    chunk = f.read(_CHUNK)
                    if not final:
                        chunk = _complete_utf8(chunk)
                    if not chunk:
                        return True
                    event = JobOutput(
                        job_id=job.job_id,
                        attempt=job.attempt,
                        data=chunk.decode("utf-8", "replace"),
                        offset=job.sent,
                        end=job.sent + len(chunk),
                    )
                    if not await self._send(event) or generation != self._generation:
                        return False
                    job.sent = max(job.sent, event.end or 0)
        except FileNotFoundError:
            return True

    def on_ack(self, ack: JobOutputAck) -> None:
        """The gateway has the output of a run up to ``ack.offset``."""
        job = self.running.get(ack.job_id) or self.finished.get(ack.job_id)
        if job is None or job.attempt != ack.attempt:
            return
        job.acked = max(job.acked, ack.offset)
        job.sent = max(job.sent, job.acked)
        if ack.exited and self.finished.get(job.job_id) is job:
            self._forget(job)

    def on_connected(self) -> None:
        """A new connection: what was sent but not acknowledged is sent again, and the ends
        not acknowledged are reported again."""
        self._generation += 1
        for job in (*self.running.values(), *self.finished.values()):
            job.sent = job.acked
        for job in list(self.finished.values()):
            self._tasks.spawn(f"report the end of job {job.job_id}", self._deliver_end(job))

    async def stop_all(self) -> None:
        await self._tasks.cancel_all()
        for job in list(self.running.values()):
            job.cancelled = True
            with contextlib.suppress(Exception):
                await job.handle.cancel(2.0)
        for job in list(self.running.values()):
            if job.task is not None:
                job.task.cancel()


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - limit, 0))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
