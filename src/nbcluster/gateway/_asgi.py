"""The gateway's ASGI app: the REST routers, token auth, JSON errors, request metrics and
body limits around one :class:`Gateway`.

Kept apart from ``_app.py`` (the wiring of the gateway's parts) so that the routers, which
read the gateway, and the app, which includes them, import in one direction only:
``_asgi`` → ``_api``/``_jobs_api`` → ``_app``.
"""

from __future__ import annotations

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
from ._api import build_router
from ._app import Gateway
from ._auth import AuthMiddleware
from ._config import GatewayConfig
from ._dashboard import build_dashboard_router
from ._errors import NbclusterError
from ._face_api import build_face_router
from ._http import FOREIGN_ERRORS, describe_validation, error_response, error_status
from ._jobs_api import UPLOAD_PATHS, build_jobs_router
from ._limits import BodyLimitMiddleware
from ._metrics import GatewayMetrics
from ._notices_api import build_notices_router
from ._state import StateStore

__all__ = ["create_app"]


def create_app(
    config: GatewayConfig,
    state_store: StateStore | None = None,
    job_store: JobStore | None = None,
) -> FastAPI:
    """The ASGI app of one gateway; ``app.state.gateway`` is its :class:`Gateway`."""
    gateway = Gateway(config, state_store, job_store)

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
        # Served from vendored files by the dashboard's router (no CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.include_router(build_router())
    app.include_router(build_jobs_router())
    app.include_router(build_notices_router())
    app.include_router(build_dashboard_router())
    app.include_router(build_face_router())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, f"{exc.detail}: {request.url.path}", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        return error_response(400, describe_validation(exc, "request"), "bad request")

    async def _gateway_error(request: Request, exc: Exception) -> Any:
        status, reason = error_status(exc) or (500, "internal error")
        return error_response(status, str(exc), reason)

    app.add_exception_handler(NbclusterError, _gateway_error)
    for foreign, _, _ in FOREIGN_ERRORS:
        if foreign is not RequestValidationError:
            app.add_exception_handler(foreign, _gateway_error)

    app.add_middleware(
        BodyLimitMiddleware,
        limit=config.max_body_bytes,
        upload_limit=config.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
        body_timeout=config.body_timeout,
    )
    app.add_middleware(_RequestMetricsMiddleware, metrics=gateway.metrics)
    app.add_middleware(AuthMiddleware, identity=gateway.identity)
    return app


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
