"""Round trip of ``1+1`` through a kernel's ZMQ face (a replicated kernel, 3 replicas) vs a
plain local ipykernel, both driven by jupyter_client's ``AsyncKernelClient`` in the same run,
cells alternating so that machine noise hits both alike. Prints the p50 ratio (target
<= 1.3: the face has no websocket hop).

A round trip: send ``execute_request("1+1")``, wait for the ``execute_reply`` and the
``idle`` status that follows.

    python benchmarks/bench_zmq_face.py [--cells 300] [--replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from _harness import percentile, start_cluster, summary

WARMUP = 20


async def round_trip(client: AsyncKernelClient) -> float:
    started = time.perf_counter()
    msg_id = client.execute("1+1")
    replied = idle = False
    while not (replied and idle):
        msg = await client.get_iopub_msg(timeout=30) if replied else None
        if not replied:
            reply = await client.get_shell_msg(timeout=30)
            replied = reply["parent_header"].get("msg_id") == msg_id
            continue
        assert msg is not None
        idle = (
            msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
            and msg["parent_header"].get("msg_id") == msg_id
        )
    return time.perf_counter() - started


async def drain(client: AsyncKernelClient) -> None:
    while True:
        try:
            await client.get_iopub_msg(timeout=0.05)
        except Exception:
            return


async def main(cells: int, replicas: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_cluster(Path(tmp) / "state", hosts=replicas, replicas=replicas)
        local = AsyncKernelManager(kernel_name="python3")
        try:
            headers = {"Authorization": f"token {cluster.token}"}
            async with httpx.AsyncClient(base_url=cluster.url, headers=headers, timeout=120) as gw:
                kernel = (await gw.post("/api/kernels", json={})).json()
                info = (await gw.get(f"/api/cluster/kernels/{kernel['id']}/connection")).json()
            face = AsyncKernelClient()
            face.load_connection_info(info)
            face.start_channels()
            await face.wait_for_ready(timeout=60)
            await local.start_kernel()
            plain = local.client()
            plain.start_channels()
            await plain.wait_for_ready(timeout=60)
            times: dict[str, list[float]] = {"face": [], "local": []}
            for i in range(cells + WARMUP):
                for name, client in (("face", face), ("local", plain)):
                    await drain(client)
                    elapsed = await round_trip(client)
                    if i >= WARMUP:
                        times[name].append(elapsed)
            print(f"ZMQ face ({replicas} replicas): {summary(times['face'])}")
            print(f"local ipykernel:          {summary(times['local'])}")
            ratio = percentile(times["face"], 50) / percentile(times["local"], 50)
            print(f"p50 ratio face / local: {ratio:.2f} (target <= 1.3)")
            face.stop_channels()
            plain.stop_channels()
        finally:
            await local.shutdown_kernel(now=True)
            cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--replicas", type=int, default=3, choices=(1, 3))
    args = parser.parse_args()
    asyncio.run(main(args.cells, args.replicas))
