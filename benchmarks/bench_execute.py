"""Round trip of a trivial cell and kernel start time: nbcluster's gateway vs a plain local
ipykernel driven by jupyter_client, measured in the same run.

A round trip is: send ``execute_request("1+1")``, wait for the ``execute_reply`` and the
``idle`` status that follows. Both kernels run at the same time and cells alternate between
them, so that machine noise (a shared 2-core VM) hits both sides alike.

    python benchmarks/bench_execute.py [--cells 500] [--starts 5] [--v1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from _harness import percentile, start_cluster, summary
from nbcluster.client import GatewayClient, KernelChannels

WARMUP = 20


async def plain_start() -> tuple[float, AsyncKernelManager, AsyncKernelClient]:
    km = AsyncKernelManager(kernel_name="python3")
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return time.perf_counter() - t0, km, kc


async def plain_cell(kc: AsyncKernelClient) -> float:
    t0 = time.perf_counter()
    msg_id = kc.execute("1+1")
    reply = idle = False
    while not (reply and idle):
        if not reply:
            shell = await kc.get_shell_msg(timeout=30)
            reply = shell["parent_header"].get("msg_id") == msg_id
        if not idle:
            io = await kc.get_iopub_msg(timeout=30)
            idle = (
                io["parent_header"].get("msg_id") == msg_id
                and io["msg_type"] == "status"
                and io["content"]["execution_state"] == "idle"
            )
    return time.perf_counter() - t0


async def gateway_cell(channels: KernelChannels) -> float:
    t0 = time.perf_counter()
    result = await channels.execute("1+1")
    elapsed = time.perf_counter() - t0
    assert result.status == "ok", result.reply
    return elapsed


async def run(url: str, token: str, cells: int, starts: int, v1: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"plain_start": [], "gw_start": [], "plain": [], "gw": []}
    async with GatewayClient(url, token) as gw:
        for _ in range(starts):
            elapsed, km, kc = await plain_start()
            times["plain_start"].append(elapsed)
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            t0 = time.perf_counter()
            kernel = await gw.start_kernel()
            times["gw_start"].append(time.perf_counter() - t0)
            await gw.shutdown_kernel(kernel["id"])

        _, km, kc = await plain_start()
        kernel = await gw.start_kernel()
        async with gw.channels(kernel["id"], v1=v1) as channels:
            for _ in range(WARMUP):
                await plain_cell(kc)
                await gateway_cell(channels)
            for _ in range(cells):
                times["plain"].append(await plain_cell(kc))
                times["gw"].append(await gateway_cell(channels))
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
        await gw.shutdown_kernel(kernel["id"])
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--v1", action="store_true", help="use the v1 binary websocket protocol")
    parser.add_argument(
        "--replicas", type=int, choices=(1, 3), default=1, help="replicas per kernel (3: Raft)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        print(f"nbcluster up --hosts {args.replicas} --replicas {args.replicas} ...", flush=True)
        cluster = start_cluster(Path(state), hosts=args.replicas, replicas=args.replicas)
        try:
            print(f"{args.starts} starts and {args.cells} cells on each side ...", flush=True)
            t = await run(cluster.url, cluster.token, args.cells, args.starts, args.v1)
        finally:
            cluster.stop()

    framing = "v1 binary" if args.v1 else "legacy JSON"
    print()
    print("trivial cell (1+1) round trip, execute_reply + idle")
    print(f"  {'plain ipykernel (jupyter_client)':36s} {summary(t['plain'])}")
    print(f"  {f'nbcluster gateway ({framing})':36s} {summary(t['gw'])}")
    ratio = percentile(t["gw"], 50) / percentile(t["plain"], 50)
    target = "1.3 with one replica" if args.replicas == 1 else "1.5 with three replicas"
    print(f"  p50 ratio gateway / plain: {ratio:.2f}   (target <= {target})")
    print()
    print("kernel start to ready")
    print(f"  {'plain ipykernel (jupyter_client)':36s} {summary(t['plain_start'])}")
    label = f"nbcluster gateway ({args.replicas} replica{'s' if args.replicas > 1 else ''})"
    print(f"  {label:36s} {summary(t['gw_start'])}")


if __name__ == "__main__":
    asyncio.run(main())
