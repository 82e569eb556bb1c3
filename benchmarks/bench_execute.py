"""Round trip of a trivial cell and kernel start time: nbcluster's gateway vs a plain local
ipykernel driven by jupyter_client, measured in the same run.

A round trip is: send ``execute_request("1+1")``, wait for the ``execute_reply`` and the
``idle`` status that follows. Both sides use the same wait logic.

    python benchmarks/bench_execute.py [--cells 500] [--starts 5] [--v1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from _harness import percentile, start_cluster, summary
from nbcluster.client import GatewayClient

WARMUP = 20


async def plain_ipykernel(cells: int, starts: int) -> tuple[list[float], list[float]]:
    start_times = []
    for _ in range(starts):
        km = AsyncKernelManager(kernel_name="python3")
        t0 = time.perf_counter()
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        start_times.append(time.perf_counter() - t0)
        kc.stop_channels()
        await km.shutdown_kernel(now=True)

    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)

    async def one() -> float:
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

    for _ in range(WARMUP):
        await one()
    round_trips = [await one() for _ in range(cells)]
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    return start_times, round_trips


async def through_gateway(
    url: str, token: str, cells: int, starts: int, v1: bool
) -> tuple[list[float], list[float]]:
    async with GatewayClient(url, token) as gw:
        start_times = []
        for _ in range(starts):
            t0 = time.perf_counter()
            kernel = await gw.start_kernel()
            start_times.append(time.perf_counter() - t0)
            await gw.shutdown_kernel(kernel["id"])
        kernel = await gw.start_kernel()
        async with gw.channels(kernel["id"], v1=v1) as channels:
            for _ in range(WARMUP):
                await channels.execute("1+1")
            round_trips = []
            for _ in range(cells):
                t0 = time.perf_counter()
                result = await channels.execute("1+1")
                round_trips.append(time.perf_counter() - t0)
                assert result.status == "ok"
        await gw.shutdown_kernel(kernel["id"])
    return start_times, round_trips


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--v1", action="store_true", help="use the v1 binary websocket protocol")
    args = parser.parse_args()

    print(
        f"plain ipykernel via jupyter_client: {args.starts} starts, {args.cells} cells ...",
        flush=True,
    )
    plain_start, plain_rt = await plain_ipykernel(args.cells, args.starts)
    with tempfile.TemporaryDirectory() as state:
        print("nbcluster up --hosts 1 ...", flush=True)
        cluster = start_cluster(Path(state), hosts=1)
        try:
            gw_start, gw_rt = await through_gateway(
                cluster.url, cluster.token, args.cells, args.starts, args.v1
            )
        finally:
            cluster.stop()

    framing = "v1 binary" if args.v1 else "legacy JSON"
    print()
    print("trivial cell (1+1) round trip, execute_reply + idle")
    print(f"  {'plain ipykernel (jupyter_client)':36s} {summary(plain_rt)}")
    print(f"  {f'nbcluster gateway ({framing})':36s} {summary(gw_rt)}")
    ratio = percentile(gw_rt, 50) / percentile(plain_rt, 50)
    print(f"  p50 ratio gateway / plain: {ratio:.2f}   (target <= 1.3 with one replica)")
    print()
    print("kernel start to ready")
    print(f"  {'plain ipykernel (jupyter_client)':36s} {summary(plain_start)}")
    print(f"  {'nbcluster gateway (1 replica)':36s} {summary(gw_start)}")


if __name__ == "__main__":
    asyncio.run(main())
