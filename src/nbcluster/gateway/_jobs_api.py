"""The job REST API: submit, list, get, cancel, logs (follow), outputs, events (SSE), inputs,
worker health and statistics. Documented in the gateway's OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ..jobs import Job, JobSpec, input_prefix
from ..scheduling import HostView
from ..store import ObjectNotFoundError, StoreError, validate_key
from ._auth import principal_of
from ._errors import ApiError
from ._http import ERROR_RESPONSES, http_error, json_body
from ._jobs import JobManager

if TYPE_CHECKING:
    from ._app import Gateway

__all__ = ["MAX_LOG_OFFSET", "UPLOAD_PATHS", "build_jobs_router", "job_too_big"]

#: The largest ``offset`` of ``GET /api/jobs/{id}/logs``: far past any log (they are capped
#: at a few MiB), and under every filesystem's largest file, past which a seek fails (a larger
#: offset once answered 500).
MAX_LOG_OFFSET = 2**40

#: Endpoints whose body is an upload: their limit is ``max_upload_bytes``, not
#: ``max_body_bytes``.
UPLOAD_PATHS = frozenset({"/api/jobs/inputs"})


def job_too_big(spec: JobSpec, hosts: Mapping[str, HostView]) -> str | None:
    """Why none of ``hosts`` could ever run ``spec`` (a job runs on one host, which must have
    its GPUs, CPUs and memory), or None. The hosts are those the scheduler knows, the ones a
    kernel's request is checked against; with none yet (a cluster starting) the job is
    queued for the hosts to come.

    A job that names a pool is checked against that pool's hosts; hosts known but none in its
    pool is a refusal too (the auto-scaler's hosts join no pool: none would come)."""
    if not hosts:
        return None
    if spec.pool is not None:
        pools = sorted({h.pool for h in hosts.values() if h.pool is not None})
        hosts = {name: h for name, h in hosts.items() if h.pool == spec.pool}
        if not hosts:
            known = ", ".join(repr(p) for p in pools) if pools else "none"
            return f"no host is in pool {spec.pool!r} (pools of the known hosts: {known})"
    where = "" if spec.pool is None else f" in pool {spec.pool!r}"
    r = spec.resources
    specs = [h.spec for h in hosts.values()]
    asked = (
        ("GPUs", r.gpus, max(s.gpus for s in specs)),
        ("CPUs", r.cpus, max(s.millicpus for s in specs) / 1000),
        ("MB of memory", r.memory_mb, max(s.memory_mb for s in specs)),
    )
    known = f"{len(specs)} host(s) known"
    for word, value, largest in asked:
        if value > largest + 1e-9:
            return (
                f"it requests {_amount(value)} {word}; the largest host{where} has "
                f"{_amount(largest)} ({known})"
            )
    if any(
        r.gpus <= s.gpus and r.cpus * 1000 <= s.millicpus + 1e-6 and r.memory_mb <= s.memory_mb
        for s in specs
    ):
        return None
    largest_hosts = ", ".join(
        f"{h.name}: {h.spec.gpus} GPUs, {_amount(h.spec.millicpus / 1000)} CPUs, "
        f"{h.spec.memory_mb} MB"
        for h in sorted(hosts.values(), key=lambda h: h.spec.gpus, reverse=True)[:3]
    )
    return (
        f"it requests {r.gpus} GPUs, {_amount(r.cpus)} CPUs and {r.memory_mb} MB of memory on one "
        f"host; no host{where} has them all ({known}; {largest_hosts})"
    )


def _amount(value: float) -> str:
    """``4``, ``0.5``, ``1000000000`` (not ``1e+09``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class CancelResult(BaseModel):
    job: Job
    message: str


def _jobs(request: Request) -> JobManager:
    gateway: Gateway = request.app.state.gateway
    return gateway.jobs


def build_jobs_router() -> APIRouter:
    router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)

    @router.post(
        "/api/jobs",
        summary="Submit a job (standard: returns at once; fast: returns its result)",
        response_model=Job,
        status_code=201,
        responses={200: {"model": Job, "description": "A fast job, finished, with its result"}},
        openapi_extra={
            "requestBody": {
                # A reference, not the model's own schema: that one's "#/$defs/..." references
                # resolve against the OpenAPI document, which has no "$defs".
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}
                },
                "required": True,
            }
        },
    )
    async def submit(request: Request) -> Any:
        gateway: Gateway = request.app.state.gateway
        spec = await json_body(
            request,
            JobSpec,
            subject="job",
            expect="a job spec",
            empty_is_object=False,
            context={"job_limits": gateway.config.job_limits},
        )
        spec = gateway.access.admit_job(principal_of(request), spec)
        too_big = job_too_big(spec, gateway.scheduling.host_views())
        if too_big is not None:
            # Refused now, as a kernel asking for more than any host has is: queued, it would
            # wait for ever.
            raise ApiError(400, f"cannot run the job: {too_big}", "job request cannot be satisfied")
        try:
            job = await _jobs(request).submit(spec)
        except TimeoutError:
            # Only a fast job is waited for; it once answered 500.
            raise ApiError(
                504,
                f"the fast job did not finish in time (its timeout of {spec.timeout:g} s, and "
                "the time to be placed on a worker and started); it was given up. A job that "
                "may wait for a worker is a standard job (fast: false)",
                "fast job timed out",
            ) from None
        status = 200 if spec.fast else 201
        return JSONResponse(job.model_dump(mode="json"), status_code=status)

    @router.get("/api/jobs", summary="List jobs", response_model=list[Job])
    async def list_jobs(
        request: Request,
        status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        queue: Literal["cpu", "gpu"] | None = None,
        owner: str | None = None,
        kernel_id: str | None = None,
    ) -> list[Job]:
        gateway: Gateway = request.app.state.gateway
        found = _jobs(request).list_jobs(status, queue, owner, kernel_id)
        return gateway.access.jobs(principal_of(request), found)

    @router.get("/api/jobs/workers", summary="Workers and their health")
    async def workers(request: Request) -> list[dict[str, Any]]:
        return _jobs(request).workers()

    @router.get("/api/jobs/stats", summary="Job and queue statistics")
    async def stats(request: Request) -> dict[str, Any]:
        return _jobs(request).statistics()

    @router.post(
        "/api/jobs/inputs",
        summary="Upload an input (raw body) to the object store; use the returned key in "
        "a job's inputs",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                }
            }
        },
    )
    async def upload_input(request: Request, name: str = Query(...)) -> dict[str, Any]:
        data = await request.body()
        # Under the uploader's own prefix: a job may read inputs only from its owner's uploads.
        key = f"{input_prefix(principal_of(request).user)}{secrets.token_hex(8)}/{name}"
        try:
            validate_key(key)
        except ValueError as exc:
            raise ApiError(400, f"name: {exc}", "bad request") from None
        gateway: Gateway = request.app.state.gateway
        store = gateway.kernels.object_store()
        try:
            # Off the event loop: a large upload must not stall every other request.
            await asyncio.to_thread(store.put, key, data)
        except StoreError as exc:
            raise http_error(exc, f"the object store did not take it: {exc}") from None
        return {"key": key, "size": len(data)}

    @router.get("/api/jobs/{job_id}", summary="A job", response_model=Job)
    async def get_job(request: Request, job_id: str) -> Job:
        return _job(request, job_id)

    @router.post("/api/jobs/{job_id}/cancel", summary="Cancel a job", response_model=CancelResult)
    async def cancel(request: Request, job_id: str) -> CancelResult:
        _job(request, job_id)
        job, message = await _jobs(request).cancel(job_id)
        return CancelResult(job=job, message=message)

    @router.get(
        "/api/jobs/{job_id}/logs",
        summary="A job's output (text); with follow=true, streamed until the job ends",
        response_class=Response,
        responses={200: {"description": "The output", "content": {"text/plain": {}}}},
    )
    async def logs(
        request: Request,
        job_id: str,
        follow: bool = False,
        offset: int = Query(0, ge=0, le=MAX_LOG_OFFSET, description="Bytes of the output to skip."),
    ) -> Response:
        manager = _jobs(request)
        _job(request, job_id)
        if not follow:
            data = await manager.read_log(job_id, offset)
            return Response(data, media_type="text/plain")
        subscriber = manager.subscribe(job_id)

        async def stream() -> AsyncIterator[bytes]:
            position = offset
            events = manager.follow(job_id, subscriber)
            try:
                async for event in events:
                    chunk = await manager.read_log(job_id, position)
                    if chunk:
                        position += len(chunk)
                        yield chunk
                    if event["type"] == "status" and event["status"] in (
                        "succeeded",
                        "failed",
                        "cancelled",
                    ):
                        break
                if not subscriber.dropped.is_set():
                    chunk = await manager.read_log(job_id, position)
                    if chunk:
                        yield chunk
            finally:
                await events.aclose()

        return _DroppableStream(stream(), subscriber.dropped, media_type="text/plain")

    @router.get(
        "/api/jobs/{job_id}/events",
        summary="Server-sent events of a job: status changes and output, until it ends",
        response_class=Response,
        responses={200: {"description": "The events", "content": {"text/event-stream": {}}}},
    )
    async def events(request: Request, job_id: str) -> Response:
        manager = _jobs(request)
        _job(request, job_id)

        subscriber = manager.subscribe(job_id)

        async def stream() -> AsyncIterator[bytes]:
            async for event in manager.follow(job_id, subscriber):
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

        return _DroppableStream(stream(), subscriber.dropped, media_type="text/event-stream")

    @router.get("/api/jobs/{job_id}/outputs", summary="A job's outputs: name -> store key")
    async def outputs(request: Request, job_id: str) -> dict[str, Any]:
        job = _job(request, job_id)
        return {"job_id": job_id, "outputs": job.output_keys, "result": job.result}

    @router.get(
        "/api/jobs/{job_id}/outputs/{name:path}",
        summary="The bytes of one output",
        response_class=Response,
        responses={200: {"description": "The bytes", "content": {"application/octet-stream": {}}}},
    )
    async def output(request: Request, job_id: str, name: str) -> Response:
        job = _job(request, job_id)
        key = job.output_keys.get(name)
        if key is None:
            raise ApiError(
                404,
                f"job {job_id} has no output {name!r}; it has: "
                f"{', '.join(sorted(job.output_keys)) or 'none'}",
                "output not found",
            )
        gateway: Gateway = request.app.state.gateway
        store = gateway.kernels.object_store()
        try:
            data = await asyncio.to_thread(store.get, key)
        except ObjectNotFoundError as exc:
            raise http_error(exc, f"output {name!r} is no longer in the store") from None
        except StoreError as exc:
            raise http_error(exc, f"the object store failed: {exc}") from None
        return Response(data, media_type="application/octet-stream")

    def _job(request: Request, job_id: str) -> Job:
        """The job if the caller may see it, else ``NoSuchJob`` (404 through the status
        table)."""
        gateway: Gateway = request.app.state.gateway
        return gateway.access.job(principal_of(request), job_id)

    return router


class _DroppableStream(StreamingResponse):
    """A streamed response that is abandoned when ``dropped`` is set (its subscriber fell too
    far behind): the send blocked on a client that stopped reading is cancelled and the
    response left unfinished, so the server closes the connection and nothing more is
    buffered for it."""

    def __init__(
        self, content: AsyncIterator[bytes], dropped: asyncio.Event, media_type: str
    ) -> None:
        super().__init__(content, media_type=media_type)
        self._dropped = dropped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(super().__call__(scope, receive, send))
        dropped = asyncio.ensure_future(self._dropped.wait())
        try:
            await asyncio.wait({sending, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
        if not sending.cancelled():
            sending.result()  # its exception, if it failed
        iterator = self.body_iterator
        if hasattr(iterator, "aclose"):
            with contextlib.suppress(Exception):
                await iterator.aclose()
