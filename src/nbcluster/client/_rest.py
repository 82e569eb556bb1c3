"""An async client for the gateway's REST API, used by the CLI, tests and benchmarks."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .. import envvars
from .._net import CLIENT_KEEPALIVE_EXPIRY
from .._tls import client_context
from ._channels import KernelChannels

__all__ = ["GatewayClient", "GatewayError"]


class GatewayError(RuntimeError):
    """The gateway answered with an error; ``status`` and the gateway's message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class GatewayClient:
    """``async with GatewayClient(url, token) as gw: kernel = await gw.start_kernel()``.

    An https gateway's certificate is verified against ``ca`` (a PEM file), else
    ``$NBCLUSTER_CA``, else the system's trust store; a certificate that does not verify
    fails every call (``httpx.ConnectError``), it is never ignored."""

    def __init__(
        self, url: str, token: str, timeout: float = 60.0, ca: str | Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        #: Verifies an https gateway (REST and channels); None for plain http.
        self.ssl: ssl.SSLContext | None = (
            client_context(ca or envvars.CA.get()) if self.url.startswith("https://") else None
        )
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"token {token}"},
            timeout=timeout,
            verify=self.ssl or True,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY),
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise GatewayError(response.status_code, message)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    async def kernelspecs(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/api/kernelspecs")
        return result

    async def list_kernels(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/api/kernels")
        return result

    async def start_kernel(
        self, name: str | None = None, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"env": env or {}}
        if name:
            body["name"] = name
        result: dict[str, Any] = await self._call("POST", "/api/kernels", json=body)
        return result

    async def get_kernel(self, kernel_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/api/kernels/{kernel_id}")
        return result

    async def shutdown_kernel(self, kernel_id: str) -> None:
        await self._call("DELETE", f"/api/kernels/{kernel_id}")

    async def interrupt_kernel(self, kernel_id: str) -> None:
        await self._call("POST", f"/api/kernels/{kernel_id}/interrupt", json={})

    async def restart_kernel(self, kernel_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", f"/api/kernels/{kernel_id}/restart", json={}
        )
        return result

    async def hosts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/api/cluster/hosts")
        return result

    async def cluster_kernels(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/api/cluster/kernels")
        return result

    def channels(self, kernel_id: str, *, v1: bool = False) -> KernelChannels:
        """A websocket to the kernel's channels; use as ``async with``."""
        return KernelChannels(self.url, self.token, kernel_id, v1=v1, ssl=self.ssl)

    async def migrate_replica(
        self, kernel_id: str, replica_id: str, host: str | None = None
    ) -> dict[str, Any]:
        """Move one replica of a kernel to ``host`` (None: the scheduler picks)."""
        body = {"host": host} if host else {}
        result: dict[str, Any] = await self._call(
            "POST",
            f"/api/cluster/kernels/{kernel_id}/replicas/{replica_id}/migrate",
            json=body,
        )
        return result

    async def drain_host(self, name: str, draining: bool = True) -> dict[str, Any]:
        """Drain a host (no new replicas, cells or jobs go there) or, ``draining=False``,
        undrain it; answers the host as :meth:`hosts` lists it."""
        result: dict[str, Any] = await self._call(
            "POST" if draining else "DELETE", f"/api/cluster/hosts/{name}/drain"
        )
        return result

    async def checkpoint_kernel(self, kernel_id: str) -> dict[str, Any]:
        """Have the kernel write a checkpoint of its state to the object store now."""
        result: dict[str, Any] = await self._call(
            "POST", f"/api/cluster/kernels/{kernel_id}/checkpoint", json={}
        )
        return result

    # -- jobs ---------------------------------------------------------------------------------

    async def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a job (a ``JobSpec`` as a dict); a fast job's answer carries its result."""
        result: dict[str, Any] = await self._call("POST", "/api/jobs", json=spec)
        return result

    async def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/api/jobs/{job_id}")
        return result

    async def list_jobs(self, **filters: str) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v}
        result: list[dict[str, Any]] = await self._call("GET", "/api/jobs", params=params)
        return result

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/api/jobs/{job_id}/cancel", json={})
        return result

    async def job_logs(self, job_id: str, offset: int = 0) -> str:
        response = await self._http.get(f"/api/jobs/{job_id}/logs", params={"offset": offset})
        if response.status_code >= 400:
            raise GatewayError(response.status_code, response.text)
        return response.text

    async def follow_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's output as it comes, until the job ends."""
        async with self._http.stream(
            "GET", f"/api/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise GatewayError(response.status_code, response.text)
            async for chunk in response.aiter_text():
                yield chunk

    async def upload_job_input(self, name: str, data: bytes) -> str:
        """Put an input in the object store; returns the key to name in ``inputs``."""
        result: dict[str, Any] = await self._call(
            "POST", "/api/jobs/inputs", params={"name": name}, content=data
        )
        return str(result["key"])

    async def job_output(self, job_id: str, name: str) -> bytes:
        response = await self._http.get(f"/api/jobs/{job_id}/outputs/{name}")
        if response.status_code >= 400:
            raise GatewayError(response.status_code, response.text)
        return response.content

    async def job_workers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/api/jobs/workers")
        return result

    async def follow_job_output(self, job_id: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The job's output as raw bytes as it comes, from byte ``offset``, until the job ends
        (or the gateway ends the stream: compare the bytes received with :meth:`get_job`'s
        status and follow again from there)."""
        async with self._http.stream(
            "GET",
            f"/api/jobs/{quote(job_id, safe='')}/logs",
            params={"follow": "true", "offset": offset},
            timeout=httpx.Timeout(self._http.timeout.connect, read=None),
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response)
            async for chunk in response.aiter_bytes():
                yield chunk

    async def stream_job_output(self, job_id: str, name: str) -> AsyncIterator[bytes]:
        """The bytes of one output, in chunks (an output may be larger than memory allows).
        An unknown job or output is a ``GatewayError`` (404) with the gateway's message."""
        path = f"/api/jobs/{quote(job_id, safe='')}/outputs/{quote(name, safe='/')}"
        async with self._http.stream("GET", path) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response)
            async for chunk in response.aiter_bytes():
                yield chunk


def _error(response: httpx.Response) -> GatewayError:
    """A ``GatewayError`` with the gateway's message (errors are ``{"message": ...}``)."""
    try:
        body = response.json()
        message = body.get("message", response.text) if isinstance(body, dict) else response.text
    except ValueError:
        message = response.text
    return GatewayError(response.status_code, message)
