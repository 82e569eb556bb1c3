"""Stock Jupyter tooling against the gateway: a ``jupyter server`` started with
``--gateway-url`` (what JupyterLab users run), and nbclient executing a notebook through
jupyter_server's ``GatewayKernelManager``.

Two shims make nbclient work with ``GatewayKernelManager`` (jupyter_server 2.x); both stand in
for things jupyter_server itself lacks, not for anything of nbcluster's:

- ``GatewayKernelClient.start_channels`` opens its websocket without the configured
  ``GatewayClient.auth_token`` (its HTTP requests do send it), so a gateway that checks tokens
  refuses it; the test adds the header to ``websocket.create_connection``.
- ``GatewayKernelManager`` has no provisioner, so jupyter_client's ``is_alive`` (which
  nbclient's ``wait_for_ready`` calls) fails an assertion; the test asks the gateway instead.

jupyter_server's own gateway proxy (the ``jupyter server`` test) needs neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
import websocket
from jupyter_server.gateway import managers
from jupyter_server.gateway.gateway_client import GatewayClient
from nbclient import NotebookClient

from nbcluster.client import KernelChannels

from ..cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.integration

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


class JupyterServer:
    def __init__(self, url: str, token: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.token = token
        self.proc = proc
        self.log = log
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"token {token}"}, timeout=60
        )


@pytest.fixture
def jupyter_server(cluster: Cluster, tmp_path: Path) -> Iterator[JupyterServer]:
    """``jupyter server`` on a free port, proxying kernels to the cluster's gateway."""
    port = free_port()
    token = "jupyter-server-token"
    root = tmp_path / "notebooks"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBCLUSTER_", "JUPYTER"))}
    # Keep the user's Jupyter configuration and runtime files out of it.
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[name] = str(tmp_path / name.lower())
    log = tmp_path / "jupyter-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                JUPYTER,
                "server",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                f"--gateway-url={cluster.url}",
                f"--GatewayClient.auth_token={cluster.token}",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = JupyterServer(f"http://127.0.0.1:{port}", token, proc, log)
    try:

        def answering() -> bool:
            assert proc.poll() is None, f"jupyter server exited:\n{log.read_text()[-3000:]}"
            return server.http.get("/api/status").status_code == 200

        wait_for(answering, 60, "jupyter server to answer")
        yield server
    finally:
        server.http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_jupyter_server_runs_cells_on_the_gateway(
    cluster: Cluster, jupyter_server: JupyterServer
) -> None:
    server = jupyter_server
    specs = server.http.get("/api/kernelspecs").json()
    assert "python3" in specs["kernelspecs"]
    assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == "Python 3 (nbcluster)"

    response = server.http.post(
        "/api/sessions",
        json={"path": "demo.ipynb", "type": "notebook", "name": "", "kernel": {"name": "python3"}},
    )
    assert response.status_code == 201, response.text
    session = response.json()
    kernel_id = session["kernel"]["id"]
    # The kernel is ours: the gateway runs it on one of its hosts.
    assert [k["id"] for k in cluster.http.get("/api/kernels").json()] == [kernel_id]
    [replica] = cluster.replicas(kernel_id)
    assert replica["host"] in cluster.hosts
    assert replica["state"] == "running"

    async with KernelChannels(server.url, server.token, kernel_id) as ch:
        result = await ch.execute("print(6 * 7)", timeout=30)
        assert result.status == "ok", result.reply
        assert result.stream_text() == "42\n"
        result = await ch.execute("import os; os.getpid()", timeout=30)
        [output] = result.of_type("execute_result")
        assert output["content"]["data"]["text/plain"] == str(replica["pid"])
        assert cluster.kernel_summary(kernel_id)["connections"] == 1

    # Ending the session shuts the kernel down on the gateway.
    assert server.http.delete(f"/api/sessions/{session['id']}").status_code == 204
    wait_for(lambda: cluster.http.get("/api/kernels").json() == [], 30, "the kernel to go")


@pytest.fixture
def gateway_client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayClient]:
    """jupyter_server's (process-wide) GatewayClient, pointed at the cluster."""
    real_connect = websocket.create_connection

    def connect_with_token(url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("header", [f"Authorization: token {cluster.token}"])
        return real_connect(url, **kwargs)

    monkeypatch.setattr(managers.websocket, "create_connection", connect_with_token)
    GatewayClient.clear_instance()
    try:
        yield GatewayClient.instance(url=cluster.url, auth_token=cluster.token)
    finally:
        GatewayClient.clear_instance()


class GatewayKernelManager(managers.GatewayKernelManager):
    """Answers ``is_alive`` from the gateway's kernel model (see the module docstring)."""

    async def _async_is_alive(self) -> bool:
        model = await self.refresh_model()
        return model is not None and model["execution_state"] != "dead"

    is_alive = _async_is_alive


async def test_nbclient_executes_a_notebook_through_the_gateway(
    cluster: Cluster, gateway_client: GatewayClient
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('hello from nbcluster')"),
        nbformat.v4.new_code_cell("answer = 6 * 7"),
        nbformat.v4.new_code_cell(
            "from IPython.display import HTML, display\n"
            "display(HTML(f'<b>{answer}</b>'))\n"
            "answer + 0.5"
        ),
    ]
    km = GatewayKernelManager()
    client = NotebookClient(nb, km=km, kernel_name="python3", timeout=30, startup_timeout=30)
    try:
        await client.async_execute()
        assert km.kernel_id in {k["id"] for k in cluster.http.get("/api/kernels").json()}
    finally:
        if km.has_kernel:
            await km.shutdown_kernel()

    first, second, third = nb.cells
    assert first.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "hello from nbcluster\n"}
    ]
    assert second.outputs == []
    assert [c.execution_count for c in nb.cells] == [1, 2, 3]
    display, result = third.outputs
    assert display["output_type"] == "display_data"
    assert display["data"]["text/html"] == "<b>42</b>"
    assert result["output_type"] == "execute_result"
    assert result["data"]["text/plain"] == "42.5"
    nbformat.validate(nb)
    assert cluster.http.get("/api/kernels").json() == []
