"""A host daemon as a batch-job worker: runs the jobs the gateway assigns it, streams their
output back, collects their outputs into the object store and reports their end.

Owned by :class:`~._daemon.HostDaemon`, which hands it ``StartJob``/``CancelJob`` requests
and gives it a function that sends events to the gateway (dropped while disconnected: the
next hello lists the jobs that still run, and a job's end is reported again on reconnect).
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
from ..hostproto import CancelJob, JobExited, JobOutput, StartJob
from ..jobs import JobHandle, JobRuntime, JobSpec, ProcessRuntime, optional_runtimes

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

#: Output is sent to the gateway at most this often, in pieces of at most this many bytes.
_FLUSH_INTERVAL = 0.1
_CHUNK = 64 * 1024
#: What a fast job returns as its result, at most.
_RESULT_LIMIT = 1 * 2**20
#: Environment variables of the daemon that a job must not see.
_PRIVATE_ENV = (envvars.TOKEN.name, envvars.RAFT_PASSWORD.name)

#: Sends an event to the gateway; False when it could not (disconnected).
Send = Callable[[JobOutput | JobExited], Awaitable[bool]]


class _RunningJob:
    def __init__(self, job_id: str, spec: JobSpec, workdir: Path, handle: JobHandle) -> None:
        self.job_id = job_id
        self.spec = spec
        self.workdir = workdir
        self.handle = handle
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None


class JobRunner:
    def __init__(self, jobs_dir: Path, send: Send) -> None:
        self.jobs_dir = jobs_dir
        self._send = send
        self.runtimes: dict[str, JobRuntime] = {"process": ProcessRuntime()}
        self._add_optional_runtimes()
        self.running: dict[str, _RunningJob] = {}
        #: Ends that could not be sent (disconnected): sent again after a reconnect.
        self.unreported: dict[str, JobExited] = {}
        self._offsets: dict[str, int] = {}

    def _add_optional_runtimes(self) -> None:
        """Container and Kubernetes runtimes, when their modules are there; their clients
        connect only when a job needs them."""
        self.runtimes.update(optional_runtimes())

    def job_ids(self) -> list[str]:
        return sorted(self.running)

    async def start(self, request: StartJob) -> dict[str, Any]:
        """Prepare the job's directory and inputs, start it; returns once it runs."""
        if request.job_id in self.running:
            raise ValueError(f"job {request.job_id} already runs here")
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
        job = _RunningJob(request.job_id, spec, workdir, handle)
        self.running[request.job_id] = job
        job.task = asyncio.create_task(self._supervise(job, log_path, request.store_url))
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
            raise LookupError(f"job {request.job_id} does not run here")
        job.cancelled = True
        await job.handle.cancel(request.grace)
        return {}

    async def _supervise(
        self, job: _RunningJob, log_path: Path, object_store_url: str | None
    ) -> None:
        streamer = asyncio.create_task(self._stream_output(job.job_id, log_path))
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
        await self._flush(job.job_id, log_path, final=True)
        if job.cancelled and not error:
            error = "cancelled"
        outputs: dict[str, str] = {}
        try:
            outputs = await asyncio.to_thread(self._collect_outputs, job, object_store_url)
        except Exception as exc:  # the store: the job's end is reported all the same
            error = error or f"could not store its outputs: {exc}"
        tail = _tail(log_path, 4096)
        result = _tail(log_path, _RESULT_LIMIT) if job.spec.fast else None
        exited = JobExited(
            job_id=job.job_id,
            exit_code=code,
            error=error,
            log_tail=tail,
            outputs=outputs,
            result=result,
        )
        self.running.pop(job.job_id, None)
        if not await self._send(exited):
            self.unreported[job.job_id] = exited
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
        keys = {}
        for name in found:
            key = f"jobs/{job.job_id}/outputs/{name}"
            object_store.put(key, (job.workdir / name).read_bytes())
            keys[name] = key
        return keys

    async def _stream_output(self, job_id: str, log_path: Path) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            await self._flush(job_id, log_path)

    async def _flush(self, job_id: str, log_path: Path, final: bool = False) -> None:
        offset = self._offsets.get(job_id, 0)
        try:
            with log_path.open("rb") as f:
                f.seek(offset)
                while chunk := f.read(_CHUNK):
                    offset += len(chunk)
                    await self._send(
                        JobOutput(job_id=job_id, data=chunk.decode("utf-8", "replace"))
                    )
        except FileNotFoundError:
            pass
        if final:
            self._offsets.pop(job_id, None)
        else:
            self._offsets[job_id] = offset

    async def resend_unreported(self) -> None:
        """After a reconnect: report the ends the gateway may have missed."""
        for exited in list(self.unreported.values()):
            if await self._send(exited):
                self.unreported.pop(exited.job_id, None)

    async def stop_all(self) -> None:
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
