"""The connection API of kernels' ZMQ faces: ``GET /api/cluster/kernels/{id}/connection``
opens the kernel's face if needed and answers its connection info (a Jupyter connection file,
``protocol.KernelConnection``); ``DELETE`` closes the face (its keys stop working; the next
``GET`` opens a new one). The kernel's owner only (and admins), as every kernel route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..protocol import KernelConnection
from ._auth import principal_of
from ._errors import ApiError
from ._http import ERROR_RESPONSES
from ._zmq_face import FacePortsExhausted

if TYPE_CHECKING:
    from ._app import Gateway

__all__ = ["build_face_router"]


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def build_face_router() -> APIRouter:
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.get(
        "/api/cluster/kernels/{kernel_id}/connection",
        summary="Connection info of the kernel's ZMQ face (opened on the first request), for "
        "jupyter_client tools: a Jupyter connection file with the face's HMAC key and CurveZMQ "
        "keys",
        response_model=KernelConnection,
        response_model_exclude_none=True,
    )
    async def kernel_connection(request: Request, kernel_id: str) -> KernelConnection:
        gateway = _gateway(request)
        kernel = gateway.access.kernel(principal_of(request), kernel_id)
        try:
            return gateway.faces.connection(kernel)
        except FacePortsExhausted as exc:
            raise ApiError(503, str(exc), "no free port") from None

    @router.delete(
        "/api/cluster/kernels/{kernel_id}/connection",
        status_code=204,
        summary="Close the kernel's ZMQ face: its clients are cut off and its keys stop working",
    )
    async def revoke_connection(request: Request, kernel_id: str) -> Response:
        gateway = _gateway(request)
        kernel = gateway.access.kernel(principal_of(request), kernel_id)
        if not gateway.faces.revoke(kernel):
            raise ApiError(404, f"kernel {kernel_id} has no ZMQ face open", "not found")
        return Response(status_code=204)

    return router
