"""The few gateway calls the provisioner makes, typed: start, look up, connect, interrupt,
restart and shut down one kernel. A client per call: jupyter_client may call a provisioner
from more than one event loop (a synchronous ``KernelManager`` runs each call on its own)."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from .._tls import client_context
from ..protocol import KernelConnection
from ._config import ProvisionerConfig

__all__ = ["GatewayApi", "GatewayCallError", "RemoteKernel"]


class GatewayCallError(RuntimeError):
    """The gateway refused a call or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteKernel(BaseModel):
    """A kernel as ``GET /api/kernels/{id}`` describes it (the fields the provisioner reads)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    execution_state: str


class GatewayApi:
    """Made by the provisioner from its config; ``transport`` lets tests put a fake gateway
    in place of the network."""

    def __init__(
        self,
        config: ProvisionerConfig,
        token: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self._token = token
        self._transport = transport
        self._ssl: ssl.SSLContext | None = (
            client_context(str(config.ca) if config.ca else None)
            if config.gateway_url.startswith("https://")
            else None
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self._config.gateway_url,
            headers={"Authorization": f"token {self._token}"},
            timeout=httpx.Timeout(30.0, read=None),
            verify=self._ssl or True,
            transport=self._transport,
        ) as http:
            try:
                response = await http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise GatewayCallError(
                    f"cannot reach the nbcluster gateway at {self._config.gateway_url}: {exc}"
                ) from None
        if response.status_code >= 400:
            raise GatewayCallError(
                f"the nbcluster gateway answered {method} {path} with {response.status_code}: "
                f"{_message(response)}",
                response.status_code,
            )
        return response

    async def start_kernel(self, name: str, env: dict[str, str]) -> RemoteKernel:
        response = await self._call("POST", "/api/kernels", json={"name": name, "env": env})
        return RemoteKernel.model_validate(response.json())

    async def kernel(self, kernel_id: str) -> RemoteKernel | None:
        """The kernel, or None when the gateway has none with that id (shut down)."""
        try:
            response = await self._call("GET", f"/api/kernels/{kernel_id}")
        except GatewayCallError as exc:
            if exc.status == 404:
                return None
            raise
        return RemoteKernel.model_validate(response.json())

    async def connection(self, kernel_id: str) -> KernelConnection:
        response = await self._call("GET", f"/api/cluster/kernels/{kernel_id}/connection")
        return KernelConnection.model_validate(response.json())

    async def interrupt(self, kernel_id: str) -> None:
        await self._call("POST", f"/api/kernels/{kernel_id}/interrupt")

    async def restart(self, kernel_id: str) -> RemoteKernel:
        response = await self._call("POST", f"/api/kernels/{kernel_id}/restart")
        return RemoteKernel.model_validate(response.json())

    async def shutdown(self, kernel_id: str) -> None:
        """Shut the kernel down; one already gone is not an error."""
        try:
            await self._call("DELETE", f"/api/kernels/{kernel_id}")
        except GatewayCallError as exc:
            if exc.status != 404:
                raise


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.text[:500]
