"""The ``nbcluster-provisioner`` path end to end: a kernelspec written by ``nbcluster
kernelspec install``, jupyter_client's ``AsyncKernelManager`` starting it (the code a stock
Jupyter server runs), cells through the ZMQ face, interrupt, restart, a re-attach from the
provisioner info (as a restarted Jupyter server would), shutdown; and nbclient running a
notebook on it beside a local kernel."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory
from nbclient import NotebookClient

from ..cluster import Cluster

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
