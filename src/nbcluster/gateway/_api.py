"""The REST API: the Jupyter Kernel Gateway surface (``/api``, ``/api/kernelspecs``,
``/api/kernels``) plus the cluster API (``/api/cluster/...``).

Errors are JSON ``{"message": ..., "reason": ...}`` as jupyter_server writes them, which is
what its gateway client reads: handlers raise the gateway's errors (``_errors``) and the app
renders them through the one status table (``_http``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from .._version import __version__
from ._auth import principal_of
from ._channels import serve_channels
from ._close_reason import close_reason
from ._errors import ApiError
from ._host_endpoint import serve_host
from ._http import ERROR_RESPONSES, json_body

if TYPE_CHECKING:
    from ._app import Gateway
    from ._kernel import GatewayKernel

__all__ = ["ApiError", "build_router"]


class StartKernelBody(BaseModel):
    """Body of ``POST /api/kernels``."""

    name: str | None = Field(None, description="Kernelspec name; the default is used if absent.")
    env: dict[str, Any] = Field(
        default_factory=dict,
        description="KERNEL_* variables for the kernel, e.g. KERNEL_GPUS, KERNEL_WORKING_DIR.",
    )
    path: str | None = Field(None, description="Accepted for compatibility; unused.")


class MigrateBody(BaseModel):
    """Body of ``POST /api/cluster/kernels/{id}/replicas/{rid}/migrate``."""

    host: str | None = Field(
        None, description="Target host; absent: the least loaded host with room."
    )


class KernelModel(BaseModel):
    id: str
    name: str
    last_activity: str
    execution_state: str
    connections: int


def _gateway(request: Request | WebSocket) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _kernel(request: Request, kernel_id: str) -> GatewayKernel:
    """The kernel if the caller may touch it, else ``NoSuchKernel`` (404 through the status
    table)."""
    return _gateway(request).access.kernel(principal_of(request), kernel_id)


def _drain(request: Request, name: str, draining: bool) -> dict[str, Any]:
    """``POST``/``DELETE /api/cluster/hosts/{name}/drain``: tell the scheduler, publish the
    notice, answer with the host as ``GET /api/cluster/hosts`` shows it."""
    gateway = _gateway(request)
    if not gateway.scheduling.drain_host(name, draining):
        raise ApiError(404, f"no host named {name!r}", "host not found")
    view = gateway.scheduling.host_view(name)
    replicas = 0 if view is None else len(view.replicas)
    jobs = 0 if view is None else len(view.jobs)
    who = principal_of(request).user or "an admin"
    if draining:
        gateway.notifier.notify(
            "host_drained",
            "info",
            f"host/{name}",
            f"host {name} drained by {who}: no new replicas, cells or jobs go there; "
            f"{replicas} replica(s) and {jobs} job(s) keep running",
        )
    else:
        gateway.notifier.notify(
            "host_undrained", "info", f"host/{name}", f"host {name} undrained by {who}"
        )
    [summary] = [h for h in gateway.host_summaries() if h["name"] == name] or [{"name": name}]
    return summary


def build_router() -> APIRouter:
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.get("/api", summary="API version")
    async def api_version() -> dict[str, str]:
        return {"version": __version__, "implementation": "nbcluster"}

    @router.get("/api/kernelspecs", summary="List kernelspecs")
    async def list_kernelspecs(request: Request) -> dict[str, Any]:
        gateway = _gateway(request)
        names = gateway.access.spec_names(principal_of(request))
        return gateway.specs.models(names)

    @router.get("/api/kernelspecs/{name}", summary="One kernelspec")
    async def get_kernelspec(request: Request, name: str) -> dict[str, Any]:
        gateway = _gateway(request)
        gateway.access.spec(principal_of(request), name)
        return gateway.specs.model(name)

    @router.get(
        "/kernelspecs/{name}/{filename}",
        summary="Kernelspec resource (logo)",
        response_class=FileResponse,
        responses={200: {"description": "The file", "content": {"*/*": {}}}},
    )
    async def kernelspec_resource(request: Request, name: str, filename: str) -> FileResponse:
        gateway = _gateway(request)
        gateway.access.spec(principal_of(request), name)
        path = gateway.specs.resource_path(name, filename)
        if path is None:
            raise ApiError(404, f"kernelspec {name!r} has no resource {filename!r}", "not found")
        return FileResponse(path)

    @router.get("/api/kernels", summary="List kernels", response_model=list[KernelModel])
    async def list_kernels(request: Request) -> list[dict[str, Any]]:
        return [k.model() for k in _gateway(request).access.kernels(principal_of(request))]

    @router.post(
        "/api/kernels",
        status_code=201,
        summary="Start a kernel",
        response_model=KernelModel,
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": StartKernelBody.model_json_schema()}}
            }
        },
    )
    async def start_kernel(request: Request) -> dict[str, Any]:
        body = await json_body(request, StartKernelBody)
        gateway = _gateway(request)
        owner = gateway.access.admit_kernel(principal_of(request), body.name, body.env)
        kernel = await gateway.kernels.start_kernel(body.name, body.env, owner)
        return kernel.model()

    @router.get("/api/kernels/{kernel_id}", summary="One kernel", response_model=KernelModel)
    async def get_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
        return _kernel(request, kernel_id).model()

    @router.delete("/api/kernels/{kernel_id}", status_code=204, summary="Shut a kernel down")
    async def delete_kernel(request: Request, kernel_id: str) -> Response:
        gateway = _gateway(request)
        _kernel(request, kernel_id)
        await gateway.kernels.shutdown_kernel(kernel_id)
        return Response(status_code=204)

    @router.post(
        "/api/kernels/{kernel_id}/interrupt", status_code=204, summary="Interrupt a kernel"
    )
    async def interrupt_kernel(request: Request, kernel_id: str) -> Response:
        gateway = _gateway(request)
        _kernel(request, kernel_id)
        await gateway.kernels.interrupt_kernel(kernel_id)
        return Response(status_code=204)

    @router.post(
        "/api/kernels/{kernel_id}/restart", summary="Restart a kernel", response_model=KernelModel
    )
    async def restart_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
        gateway = _gateway(request)
        _kernel(request, kernel_id)
        kernel = await gateway.kernels.restart_kernel(kernel_id)
        return kernel.model()

    @router.websocket("/api/kernels/{kernel_id}/channels")
    async def channels(websocket: WebSocket, kernel_id: str) -> None:
        gateway = _gateway(websocket)
        try:
            kernel = gateway.access.kernel(principal_of(websocket), kernel_id)
        except LookupError:  # NoSuchKernel: unknown, or not the caller's
            await websocket.close(1008, close_reason(f"no kernel with id {kernel_id}"))
            return
        await serve_channels(websocket, kernel, gateway.metrics, gateway.config.client_queue_limit)

    @router.websocket("/api/cluster/hosts/connect")
    async def host_connect(websocket: WebSocket) -> None:
        gateway = _gateway(websocket)
        await serve_host(
            websocket,
            gateway.hosts,
            gateway.kernels,
            gateway.config.heartbeat_interval,
            gateway.jobs,
        )

    @router.get("/api/cluster/hosts", summary="Hosts, their resources and replicas")
    async def cluster_hosts(request: Request) -> list[dict[str, Any]]:
        return _gateway(request).host_summaries()

    @router.post(
        "/api/cluster/hosts/{name}/drain",
        summary="Drain a host: no new replicas, cells or jobs go there; what runs keeps running",
    )
    async def drain_host(request: Request, name: str) -> dict[str, Any]:
        return _drain(request, name, True)

    @router.delete(
        "/api/cluster/hosts/{name}/drain", summary="Undrain a host: it takes new work again"
    )
    async def undrain_host(request: Request, name: str) -> dict[str, Any]:
        return _drain(request, name, False)

    @router.get("/api/cluster/kernels", summary="Kernels and where their replicas run")
    async def cluster_kernels(request: Request) -> list[dict[str, Any]]:
        gateway = _gateway(request)
        return [gateway.kernel_summary(k) for k in gateway.access.kernels(principal_of(request))]

    @router.get(
        "/api/cluster/kernels/{kernel_id}",
        summary="One kernel: where its replicas run, and whether it runs degraded",
    )
    async def cluster_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
        return _gateway(request).kernel_summary(_kernel(request, kernel_id))

    @router.post(
        "/api/cluster/kernels/{kernel_id}/replicas/{replica_id}/migrate",
        summary="Move a replica to another host (it catches up through Raft, then the old "
        "one retires)",
    )
    async def migrate_replica(request: Request, kernel_id: str, replica_id: str) -> dict[str, Any]:
        body = await json_body(request, MigrateBody)
        gateway = _gateway(request)
        _kernel(request, kernel_id)
        return await gateway.kernels.migrate_replica(kernel_id, replica_id, body.host)

    @router.post(
        "/api/cluster/kernels/{kernel_id}/checkpoint",
        summary="Write a checkpoint of the kernel's state to the object store now",
    )
    async def checkpoint_kernel(request: Request, kernel_id: str) -> dict[str, Any]:
        gateway = _gateway(request)
        _kernel(request, kernel_id)
        return await gateway.kernels.checkpoint_kernel(kernel_id)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        include_in_schema=True,
        response_class=Response,
        responses={200: {"description": "The metrics", "content": {"text/plain": {}}}},
    )
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(
            generate_latest(_gateway(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return router
