"""The nbcluster kernel provisioner against a fake gateway (httpx's MockTransport): which
REST calls each jupyter_client hook makes, what it returns, and the errors it names."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from jupyter_client.kernelspec import KernelSpec

from nbcluster.provisioner import NbclusterProvisioner, ProvisionerConfigError

CONNECTION = {
    "transport": "tcp",
    "ip": "127.0.0.1",
    "shell_port": 40001,
    "iopub_port": 40002,
    "stdin_port": 40003,
    "control_port": 40004,
    "hb_port": 40005,
    "key": "f" * 64,
    "signature_scheme": "hmac-sha256",
    "kernel_name": "python3",
}


class FakeGateway:
    """Kernels by id and the calls made, as the gateway's REST API answers them."""

    def __init__(self, start_delay: float = 0.0) -> None:
        self.kernels: dict[str, str] = {}  # id -> execution_state
        self.calls: list[tuple[str, str, Any]] = []
        self.start_delay = start_delay
        self.token_seen: str | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.token_seen = request.headers.get("authorization")
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and request.url.path == "/api/kernels":
            await asyncio.sleep(self.start_delay)
            kernel_id = f"g{len(self.kernels) + 1}"
            self.kernels[kernel_id] = "idle"
            return httpx.Response(201, json=self._model(kernel_id))
        kernel_id = parts[2] if parts[:2] == ["api", "kernels"] else parts[3]
        if kernel_id not in self.kernels:
            return httpx.Response(404, json={"message": f"no kernel with id {kernel_id}"})
        if request.method == "DELETE":
            del self.kernels[kernel_id]
            return httpx.Response(204)
        if parts[-1] == "connection":
            return httpx.Response(200, json=CONNECTION)
        if parts[-1] in ("interrupt",):
            return httpx.Response(204)
        return httpx.Response(200, json=self._model(kernel_id))

    def _model(self, kernel_id: str) -> dict[str, Any]:
        return {
            "id": kernel_id,
            "name": "python3",
            "execution_state": self.kernels[kernel_id],
            "last_activity": "",
            "connections": 0,
        }


def provisioner(gateway: FakeGateway, **config: Any) -> NbclusterProvisioner:
    spec = KernelSpec(argv=[], display_name="nbc", language="python", resource_dir="/tmp")
    made = NbclusterProvisioner(
        kernel_id="jupyter-1",
        kernel_spec=spec,
        **{"gateway_url": "http://gateway.test:8889", "gpus": 1, **config},
    )
    made.transport = httpx.MockTransport(gateway)
    return made


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBCLUSTER_TOKEN", "user-token")


async def launch(p: NbclusterProvisioner, env: dict[str, str] | None = None) -> dict[str, Any]:
    kwargs = await p.pre_launch(env=env or {"KERNEL_USERNAME": "ada", "HOME": "/home/ada"})
    return dict(await p.launch_kernel(kwargs.pop("cmd"), **kwargs))


async def test_launch_starts_a_kernel_and_returns_its_face() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    info = await launch(p)
    assert info["key"] == CONNECTION["key"].encode()  # as a KernelManager holds it
    assert info["shell_port"] == 40001
    assert p.has_process and p.gateway_kernel_id == "g1"
    method, path, body = gateway.calls[0]
    assert (method, path) == ("POST", "/api/kernels")
    # KERNEL_* of the server's environment and the kernelspec's resources; nothing else.
    assert body == {"name": "python3", "env": {"KERNEL_USERNAME": "ada", "KERNEL_GPUS": "1"}}
    assert gateway.token_seen == "token user-token"
    assert await p.poll() is None


async def test_launch_timeout_says_why() -> None:
    p = provisioner(FakeGateway(start_delay=5), launch_timeout=0.1)
    with pytest.raises(TimeoutError, match=r"did not start within launch_timeout=0\.1 s"):
        await launch(p)


async def test_a_kernel_that_starts_after_the_timeout_is_shut_down() -> None:
    gateway = FakeGateway(start_delay=0.3)
    p = provisioner(gateway, launch_timeout=0.1)
    with pytest.raises(TimeoutError):
        await launch(p)
    assert p.gateway_kernel_id is None  # the manager's cleanup has nothing to shut down
    for _ in range(100):  # bounded: the gateway answers the start after 0.3 s
        if any(method == "DELETE" for method, _, _ in gateway.calls):
            break
        await asyncio.sleep(0.02)
    assert ("DELETE", "/api/kernels/g1", None) in gateway.calls
    assert gateway.kernels == {}


async def test_interrupt_shutdown_and_poll() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    await launch(p)
    await p.send_signal(signal.SIGINT)
    assert gateway.calls[-1][:2] == ("POST", "/api/kernels/g1/interrupt")
    await p.send_signal(0)  # a liveness probe: no call
    assert len(gateway.calls) == 3
    await p.shutdown_requested(restart=False)
    await p.terminate()
    assert gateway.calls[-1][:2] == ("DELETE", "/api/kernels/g1")
    assert await p.wait() == -signal.SIGTERM
    await p.cleanup()
    assert not p.has_process


async def test_a_kernel_gone_or_dead_without_asking_is_reported_ended() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    await launch(p)
    gateway.kernels["g1"] = "dead"
    assert await p.poll() == 1  # the restarter restarts it
    del gateway.kernels["g1"]
    assert await p.poll() == 1


async def test_an_unreachable_gateway_is_not_a_dead_kernel() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    await launch(p)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    p.transport = httpx.MockTransport(refuse)
    assert await p.poll() is None


async def test_restart_keeps_the_gateway_kernel() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    await launch(p)
    await p.shutdown_requested(restart=True)
    assert await p.poll() == 0  # the manager sees the old "process" gone ...
    await p.kill(restart=True)
    await p.cleanup(restart=True)
    await launch(p)  # ... and the launch restarts the same kernel
    assert ("POST", "/api/kernels/g1/restart", None) in gateway.calls
    assert list(gateway.kernels) == ["g1"] and p.gateway_kernel_id == "g1"
    assert await p.poll() is None


async def test_provisioner_info_reattaches() -> None:
    gateway = FakeGateway()
    p = provisioner(gateway)
    await launch(p)
    info = await p.get_provisioner_info()
    saved = json.loads(json.dumps(info))  # what a server persists
    again = provisioner(gateway)
    await again.load_provisioner_info(saved)
    assert again.gateway_kernel_id == "g1" and again.has_process
    assert again.connection_info["key"] == CONNECTION["key"].encode()
    del gateway.kernels["g1"]
    with pytest.raises(ValueError, match="has no kernel g1 any more"):
        await provisioner(gateway).load_provisioner_info(saved)
    with pytest.raises(ValueError, match="now names http://elsewhere"):
        await provisioner(gateway, gateway_url="http://elsewhere:1").load_provisioner_info(saved)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ProvisionerConfigError, match=r"gateway_url: .*not an http"):
        provisioner(FakeGateway(), gateway_url="gateway:8889")
    with pytest.raises(ProvisionerConfigError, match="gpu: Extra inputs are not permitted"):
        provisioner(FakeGateway(), gpu=1)
    with pytest.raises(ProvisionerConfigError, match=r"gpus: .*greater than or equal to 0"):
        provisioner(FakeGateway(), gpus=-1)


async def test_token_comes_from_the_environment_or_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NBCLUSTER_TOKEN")
    with pytest.raises(ProvisionerConfigError, match="set NBCLUSTER_TOKEN"):
        await launch(provisioner(FakeGateway()))
    monkeypatch.setenv("MY_TOKEN", "from-env")
    gateway = FakeGateway()
    await launch(provisioner(gateway, token_env="MY_TOKEN"))
    assert gateway.token_seen == "token from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    gateway = FakeGateway()
    await launch(provisioner(gateway, token_file=str(token_file)))
    assert gateway.token_seen == "token from-file"
