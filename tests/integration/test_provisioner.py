"""The ``nbcluster-provisioner`` path end to end: a kernelspec written by ``nbcluster
kernelspec install``, jupyter_client's ``AsyncKernelManager`` starting it (the code a stock
Jupyter server runs), cells through the ZMQ face, interrupt, restart, a re-attach from the
provisioner info (as a restarted Jupyter server would), shutdown; nbclient running a
notebook on it beside a local kernel; ``jupyter console --kernel``; and a stock ``jupyter
server`` (no ``--gateway-url``) offering it beside its local kernels."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory
from nbclient import NotebookClient

from nbcluster.client import KernelChannels

from ..cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def specs(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KernelSpecManager]:
    """``nbcluster kernelspec install nbc-1gpu --gpus 1`` into a prefix of the test's own."""
    prefix = tmp_path / "prefix"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "kernelspec",
            "install",
            "nbc-1gpu",
            "--gateway",
            cluster.url,
            "--gpus",
            "1",
            "--prefix",
            str(prefix),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # The Jupyter server's environment holds the token (never the kernelspec).
    monkeypatch.setenv("NBCLUSTER_TOKEN", cluster.token)
    kernels = prefix / "share" / "jupyter" / "kernels"
    spec = json.loads((kernels / "nbc-1gpu" / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (nbcluster, 1 GPU)"
    assert cluster.token not in json.dumps(spec)
    yield KernelSpecManager(kernel_dirs=[str(kernels)])


def manager(specs: KernelSpecManager) -> AsyncKernelManager:
    return AsyncKernelManager(kernel_name="nbc-1gpu", kernel_spec_manager=specs)


async def run(km: AsyncKernelManager, code: str) -> tuple[dict[str, Any], str]:
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = await client.execute_interactive(
            code,
            output_hook=lambda m: (
                out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None
            ),
            timeout=60,
        )
        return reply, "".join(out)
    finally:
        client.stop_channels()


def gateway_kernels(cluster: Cluster) -> list[str]:
    return [k["id"] for k in cluster.http.get("/api/kernels").json()]


async def test_start_interrupt_restart_reattach_shutdown(
    cluster: Cluster, specs: KernelSpecManager
) -> None:
    km = manager(specs)
    await km.start_kernel()
    try:
        provisioner = km.provisioner
        assert provisioner is not None
        gateway_id = provisioner.gateway_kernel_id  # type: ignore[attr-defined]
        assert gateway_kernels(cluster) == [gateway_id]
        reply, out = await run(km, "import os; x = 7; print(os.environ['KERNEL_GPUS'])")
        assert reply["content"]["status"] == "ok" and out == "1\n"
        assert await km.is_alive()

        # Interrupt (SIGINT through the provisioner: the gateway's interrupt).
        client = km.client()
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        msg_id = client.execute("import time\nprint('go', flush=True)\ntime.sleep(120)")
        while True:
            msg = await client.get_iopub_msg(timeout=60)
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                break
        await km.interrupt_kernel()
        reply = await client.get_shell_msg(timeout=30)
        client.stop_channels()
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        # Re-attach as a restarted Jupyter server would: a new manager from the saved info.
        info = await provisioner.get_provisioner_info()
        assert json.loads(json.dumps(info)) == info  # persisted as JSON
        km2 = manager(specs)
        km2.kernel_id = km.kernel_id
        km2.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            km.kernel_id, km2.kernel_spec, parent=km2
        )
        await km2.provisioner.load_provisioner_info(info)
        km2.load_connection_info(km2.provisioner.connection_info)
        reply, out = await run(km2, "print(x)")
        assert out == "7\n"

        # Restart: the same gateway kernel, its state cleared.
        await km.restart_kernel()
        assert provisioner.gateway_kernel_id == gateway_id  # type: ignore[attr-defined]
        reply, out = await run(km, "print('x' in dir())")
        assert out == "False\n"
    finally:
        await km.shutdown_kernel()
    assert gateway_kernels(cluster) == []


async def test_nbclient_runs_a_notebook_beside_a_local_kernel(
    cluster: Cluster, specs: KernelSpecManager
) -> None:
    def notebook() -> nbformat.NotebookNode:
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            nbformat.v4.new_code_cell("import os\nwhere = os.environ.get('NBCLUSTER_KERNEL_ID')"),
            nbformat.v4.new_code_cell("print(bool(where))"),
        ]
        return nb

    remote, local = notebook(), notebook()
    km = manager(specs)
    try:
        await asyncio.gather(
            NotebookClient(remote, km=km, timeout=60).async_execute(),
            NotebookClient(local, kernel_name="python3", timeout=60).async_execute(),
        )
    finally:
        # nbclient leaves a manager it was given running.
        await km.shutdown_kernel()
    assert remote.cells[1].outputs[0]["text"] == "True\n"
    assert local.cells[1].outputs[0]["text"] == "False\n"
    assert gateway_kernels(cluster) == []


def test_jupyter_console_runs_cells_on_a_curve_face(
    cluster: Cluster, specs: KernelSpecManager, tmp_path: Path
) -> None:
    """``jupyter console --kernel NAME`` with the installed kernelspec, on a gateway with
    CurveZMQ on (the default): its manager hands the client the face's keys, so cells run."""
    kernels_dir = Path(specs.kernel_dirs[0])
    env = {
        **os.environ,
        "JUPYTER_PATH": str(kernels_dir.parent),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "jupyter_console", "--kernel", "nbc-1gpu", "--simple-prompt"],
        input="x = 6 * 7\nprint(x)\nexit()\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "42" in done.stdout, done.stdout + done.stderr
    assert "Shutting down kernel" in done.stdout, done.stdout + done.stderr
    # exit() shut the kernel down through the provisioner.
    assert gateway_kernels(cluster) == []


def test_a_stock_jupyter_server_offers_nbcluster_beside_local_kernels(
    cluster: Cluster, specs: KernelSpecManager, tmp_path: Path
) -> None:
    """``jupyter server`` without ``--gateway-url``, the installed kernelspec on its path and
    the token in its environment: its kernelspecs list both, a session of each runs a cell
    (the nbcluster one on a replica), a restart through the server keeps the gateway's
    kernel, and ending the session shuts it down on the gateway."""
    port = free_port()
    token = "jupyter-server-token"
    root = tmp_path / "notebooks"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env["JUPYTER_PATH"] = str(Path(specs.kernel_dirs[0]).parent)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[name] = str(tmp_path / name.lower())
    log = tmp_path / "jupyter-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("jupyter")),
                "server",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--ServerApp.root_dir={root}",
                *(["--allow-root"] if os.geteuid() == 0 else []),
            ],
            env={**env, "JUPYTER_TOKEN": token},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=120)
    try:

        def answering() -> bool:
            assert proc.poll() is None, f"jupyter server exited:\n{log.read_text()[-3000:]}"
            try:
                return http.get("/api/status").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answering, 60, "jupyter server to answer")
        names = set(http.get("/api/kernelspecs").json()["kernelspecs"])
        assert {"python3", "nbc-1gpu"} <= names, names

        sessions = {}
        for kernel in ("nbc-1gpu", "python3"):
            response = http.post(
                "/api/sessions",
                json={"path": f"{kernel}.ipynb", "type": "notebook", "kernel": {"name": kernel}},
            )
            assert response.status_code == 201, response.text + log.read_text()[-3000:]
            sessions[kernel] = response.json()
        [on_gateway] = gateway_kernels(cluster)

        code = "import os; print(bool(os.environ.get('NBCLUSTER_KERNEL_ID')))"
        for kernel, expected in (("nbc-1gpu", "True\n"), ("python3", "False\n")):
            kernel_id = sessions[kernel]["kernel"]["id"]
            assert asyncio.run(_cell(url, token, kernel_id, code)) == expected, kernel

        remote = sessions["nbc-1gpu"]["kernel"]["id"]
        assert http.post(f"/api/kernels/{remote}/restart").status_code == 200
        assert gateway_kernels(cluster) == [on_gateway]  # restarted in place, same face
        assert asyncio.run(_cell(url, token, remote, "print(6 * 7)")) == "42\n"

        for session in sessions.values():
            assert http.delete(f"/api/sessions/{session['id']}").status_code == 204
        wait_for(lambda: gateway_kernels(cluster) == [], 30, "the gateway's kernel to go")
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _cell(url: str, token: str, kernel_id: str, code: str) -> str:
    """Run ``code`` on a Jupyter server's kernel through its websocket; its stdout."""
    async with KernelChannels(url, token, kernel_id) as channels:
        result = await channels.execute(code, timeout=60)
        assert result.status == "ok", result.reply
        return result.stream_text()
