"""The gateway application: wires hosts, kernels, kernelspecs, state and metrics into a
FastAPI app with token auth, JSON errors and request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
from ..jobs import JobStore
from ..scheduling import HostView, KernelView, ScaleIn, ScaleOut, ScalingConfig
from ._api import ApiError, build_router, error_response
from ._auth import TokenAuthMiddleware
from ._autoscaler import Autoscaler
from ._config import GatewayConfig
from ._hosts import HostRegistry
from ._jobs import JobError, JobManager, NoSuchJob
from ._jobs_api import build_jobs_router
from ._kernel import GatewayKernel, KernelUnavailable
from ._kernelspecs import KernelSpecRegistry
from ._manager import (
    CheckpointError,
    KernelManager,
    KernelRejected,
    KernelRequestError,
    KernelStartError,
    MigrationError,
    NoSuchKernel,
)
from ._metrics import GatewayMetrics
from ._provider import HostProvider, LocalProcessHostProvider
from ._state import FileStateStore, StateStore

__all__ = ["Gateway", "create_app"]

log = logging.getLogger(__name__)


class Gateway:
    """Everything one gateway process holds. Built by :func:`create_app`."""

    def __init__(
        self,
        config: GatewayConfig,
        store: StateStore | None = None,
        job_store: JobStore | None = None,
    ) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.hosts = HostRegistry(config.host_lost_timeout)
        self.specs = KernelSpecRegistry(config.kernelspec_dirs)
        self.store = store if store is not None else FileStateStore(config.state_dir)
        #: Set in :meth:`start` when the gateway may add hosts (``max_hosts`` above 0); the
        #: kernel manager and the scheduler driver reach it through this gateway
        #: (``request_hosts`` and friends), which answers for it when there is none.
        self.autoscaler: Autoscaler | None = None
        self.kernels = KernelManager(
            config, self.hosts, self.specs, self.store, self.metrics, host_supply=self
        )
        #: The one driver of the scheduler (owned by the kernel manager): views for readers.
        self.scheduling = self.kernels.scheduling
        self.jobs = JobManager(
            job_store if job_store is not None else _job_store(config),
            self.hosts,
            self.scheduling,
            self.metrics,
            config.store_url or config.store_dir.as_uri(),
            yield_to_cells=config.jobs_yield_to_cells,
        )
        self.metrics.watch(self.hosts, lambda: self.kernels.kernels.values(), self.scheduling)
        self._watchdog: asyncio.Task[None] | None = None
        self._scaling: asyncio.Task[None] | None = None
        self._orphan_check: asyncio.Task[None] | None = None
        self._reclaimer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.kernels.restore()
        self.jobs.restore()
        self._orphan_check = asyncio.create_task(
            self._expire_orphan_jobs(self.config.host_lost_timeout * 2)
        )
        self._watchdog = asyncio.create_task(self._watch_hosts())
        if self.config.reclaim_idle_after is not None:
            self._reclaimer = asyncio.create_task(self.kernels.reclaim_idle())
        if self.config.max_hosts > 0:
            self.autoscaler = self._make_autoscaler()
            self._scaling = asyncio.create_task(self.autoscaler.run())

    # -- hosts on demand (``HostSupply`` of the kernel manager and the scheduler driver) -----

    def request_hosts(self, action: ScaleOut) -> None:
        if self.autoscaler is None:
            log.info("would scale out by %d host(s): %s", action.count, action.reason)
        else:
            self.autoscaler.request(action)

    def release_hosts(self, action: ScaleIn) -> None:
        if self.autoscaler is None:
            log.info("would scale in %s: %s", ", ".join(action.hosts), action.reason)
        else:
            self.autoscaler.release(action)

    async def wait_for_hosts(self, timeout: float) -> bool:
        if self.autoscaler is None:
            return False  # nothing is coming
        return await self.autoscaler.wait_for_hosts(timeout)

    def host_registered(self, name: str) -> None:
        if self.autoscaler is not None:
            self.autoscaler.host_registered(name)

    def _make_autoscaler(self, provider: HostProvider | None = None) -> Autoscaler:
        config = self.config
        if provider is None:
            ip = config.ip if config.ip not in ("0.0.0.0", "::", "") else "127.0.0.1"
            host = f"[{ip}]" if ":" in ip else ip
            provider = LocalProcessHostProvider(
                gateway_url=f"http://{host}:{config.port}",
                token=config.token,
                state_dir=config.state_dir.parent,
                gpus_per_host=config.scaling_gpus_per_host,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            )
        scaling = ScalingConfig(
            buffer_hosts=config.scaling_buffer,
            min_hosts=config.min_hosts,
            max_hosts=config.max_hosts,
            gpus_per_host=max(config.scaling_gpus_per_host, 1),
            replicas_per_kernel=config.replicas_per_kernel,
        )
        return Autoscaler(
            provider,
            self.scheduling,
            self.hosts,
            self.metrics,
            scaling,
            config.scaling_interval,
            startup_grace=max(2 * config.host_lost_timeout, 5.0),
        )

    async def stop(self) -> None:
        for task in (self._watchdog, self._scaling, self._orphan_check, self._reclaimer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.kernels.close()
        await self.jobs.close()
        if self.autoscaler is not None:
            await self.autoscaler.close()

    async def _watch_hosts(self) -> None:
        period = min(self.config.heartbeat_interval, self.config.host_lost_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for entry in self.hosts.find_lost(time.monotonic()):
                self.kernels.on_host_lost(entry)
                self.jobs.on_worker_lost(entry.name)

    async def _expire_orphan_jobs(self, delay: float) -> None:
        """Jobs restored as running whose worker never came back are run again."""
        await asyncio.sleep(delay)
        for live in list(self.jobs.jobs.values()):
            job = live.job
            if job.status == "running" and job.worker not in self.hosts.hosts:
                self.jobs.on_worker_lost(job.worker or "?")

    def host_summaries(self) -> list[dict[str, Any]]:
        replicas: dict[str, list[dict[str, str]]] = {}
        for kernel in self.kernels.kernels.values():
            for r in kernel.live_replicas():
                replicas.setdefault(r.host, []).append(
                    {"kernel_id": kernel.id, "replica_id": r.replica_id, "state": r.state}
                )
        now = time.monotonic()
        views = self.scheduling.host_views()
        return [
            {
                **_gpu_state(views.get(h.name)),
                "name": h.name,
                "state": h.state,
                "address": h.address,
                "cpus": h.resources.cpus,
                "memory_mb": h.resources.memory_mb,
                "gpus": [g.model_dump() for g in h.resources.gpus],
                "seconds_since_heartbeat": round(now - h.last_seen, 3),
                "replicas": replicas.get(h.name, []),
            }
            for h in sorted(self.hosts.hosts.values(), key=lambda h: h.name)
        ]

    def kernel_summaries(self) -> list[dict[str, Any]]:
        return [self.kernel_summary(k) for k in self.kernels.kernels.values()]

    def kernel_summary(self, k: GatewayKernel) -> dict[str, Any]:
        """One kernel for the cluster API: where its replicas run, and whether it runs with
        fewer than configured (``degraded``; ``repair`` says what is done about it)."""
        view = self.scheduling.kernel_view(k.id)
        return {
            **_scheduling_state(k.record.policy, view),
            **k.model(),
            "created": k.record.created.isoformat(),
            "executor": k.executor,
            "execution_count": k.execution_count,
            "dead_reason": k.record.dead_reason,
            "replicas_wanted": k.record.replica_count,
            "replicas_running": k.serving_replicas,
            "degraded": k.degraded,
            "repair": None if k.repair is None else k.repair.summary(),
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "host": r.host,
                    "state": r.state,
                    "pid": r.pid,
                    "reason": r.reason,
                }
                for r in k.record.replicas
            ],
        }


def _gpu_state(view: HostView | None) -> dict[str, Any]:
    if view is None:
        return {"gpus_idle": None, "gpus_committed": None, "gpus_pending": None}
    return {
        "gpus_idle": view.idle_gpus,
        "gpus_committed": view.committed_gpus,
        "gpus_pending": view.pending.gpus,
        "subscription_ratio": round(view.subscription_ratio, 3),
        "draining": view.draining,
    }


def _scheduling_state(policy: str, view: KernelView | None) -> dict[str, Any]:
    if view is None:
        return {"policy": policy, "request": None, "binding": None, "waiting_cells": 0}
    b = view.binding
    return {
        "policy": view.policy,
        "request": view.request.fields(),
        "binding": None
        if b is None
        else {"term": b.term, "replica_id": b.replica_id, "host": b.host, "gpus": b.device_indices},
        "waiting_cells": len(view.waiting),
    }


class _RequestMetricsMiddleware:
    """Records the latency of each HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.http_latency.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {})
            return f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}"
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(problems)


def create_app(
    config: GatewayConfig, store: StateStore | None = None, job_store: JobStore | None = None
) -> FastAPI:
    """The ASGI app of one gateway; ``app.state.gateway`` is its :class:`Gateway`."""
    gateway = Gateway(config, store, job_store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="nbcluster gateway",
        version=__version__,
        description=(
            "Jupyter Kernel Gateway API (kernelspecs, kernels, channels websocket) and the "
            "nbcluster cluster API. Every endpoint needs the token: "
            "`Authorization: token <token>` or `?token=<token>`."
        ),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.include_router(build_router())
    app.include_router(build_jobs_router())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, f"{exc.detail}: {request.url.path}", str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Any:
        return error_response(exc.status, exc.message, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        return error_response(400, _describe_validation(exc), "bad request")

    @app.exception_handler(KernelRequestError)
    async def _bad_kernel_request(request: Request, exc: KernelRequestError) -> Any:
        return error_response(400, str(exc), "bad request")

    @app.exception_handler(NoSuchKernel)
    async def _no_kernel(request: Request, exc: NoSuchKernel) -> Any:
        return error_response(404, str(exc), "kernel not found")

    @app.exception_handler(KernelStartError)
    async def _start_failed(request: Request, exc: KernelStartError) -> Any:
        return error_response(503, str(exc), "kernel could not be started")

    @app.exception_handler(KernelRejected)
    async def _rejected(request: Request, exc: KernelRejected) -> Any:
        if exc.permanent:
            return error_response(400, str(exc), "kernel request cannot be satisfied")
        return error_response(503, str(exc), "no capacity for the kernel")

    @app.exception_handler(MigrationError)
    async def _migration_failed(request: Request, exc: MigrationError) -> Any:
        return error_response(409, str(exc), "migration refused or failed")

    @app.exception_handler(CheckpointError)
    async def _checkpoint_failed(request: Request, exc: CheckpointError) -> Any:
        return error_response(409, str(exc), "checkpoint failed")

    @app.exception_handler(NoSuchJob)
    async def _no_job(request: Request, exc: NoSuchJob) -> Any:
        return error_response(404, str(exc), "job not found")

    @app.exception_handler(JobError)
    async def _job_error(request: Request, exc: JobError) -> Any:
        return error_response(409, str(exc), "job request failed")

    @app.exception_handler(KernelUnavailable)
    async def _unavailable(request: Request, exc: KernelUnavailable) -> Any:
        return error_response(409, str(exc), "kernel unavailable")

    app.add_middleware(_RequestMetricsMiddleware, metrics=gateway.metrics)
    app.add_middleware(TokenAuthMiddleware, token=config.token)
    return app


def _job_store(config: GatewayConfig) -> JobStore:
    """Redis when the gateway was given ``--redis``, else files under the state directory."""
    if config.redis_url:
        from urllib.parse import parse_qs, urlsplit

        from ..jobs._redisstore import RedisJobStore

        parts = urlsplit(config.redis_url)
        prefix = parse_qs(parts.query).get("prefix", ["nbcluster/jobs/"])[-1]
        return RedisJobStore.from_url(parts._replace(query="").geturl(), prefix=prefix)
    from ..jobs._filestore import FileJobStore

    return FileJobStore(config.state_dir / "jobs")
