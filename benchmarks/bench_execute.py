"""Round trip of a trivial cell and kernel start time: nbcluster's gateway vs a plain local
ipykernel driven by jupyter_client, measured in the same run; and the cost of encrypted
transport (TLS to the gateway, CurveZMQ to the replicas) against the plain path.

A round trip is: send ``execute_request("1+1")``, wait for the ``execute_reply`` and the
``idle`` status that follows. Every kernel runs at the same time and cells alternate between
them, so that machine noise (a shared 2-core VM) hits all sides alike.

With ``--replicas 3`` (or ``--encrypted``) two clusters run side by side: a plain one (http,
``--no-curve``) and an encrypted one (``--certfile/--keyfile`` with a throw-away CA, CurveZMQ
on, as by default), and the encrypted / plain ratio is printed (target <= 1.1).

    python benchmarks/bench_execute.py [--cells 500] [--starts 5] [--v1] [--replicas 1|3]
        [--encrypted | --no-encrypted]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from _harness import RunningCluster, percentile, start_cluster, summary
from nbcluster.client import GatewayClient, KernelChannels

# The throw-away CA and certificate come from the tests' helper (cryptography only).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tls_files import make_tls_files

WARMUP = 20


@dataclass
class Side:
    """One nbcluster under test: its name in the output, where it is, the CA to verify it."""

    name: str
    cluster: RunningCluster
    ca: Path | None = None

    def client(self) -> GatewayClient:
        return GatewayClient(self.cluster.url, self.cluster.token, ca=self.ca)


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


@contextlib.asynccontextmanager
async def kernel_channels(gw: GatewayClient, v1: bool) -> AsyncIterator[KernelChannels]:
    kernel = await gw.start_kernel()
    try:
        async with gw.channels(kernel["id"], v1=v1) as channels:
            yield channels
    finally:
        await gw.shutdown_kernel(kernel["id"])


async def run(sides: list[Side], cells: int, starts: int, v1: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"plain_start": [], "plain": []}
    for side in sides:
        times[f"{side.name}_start"], times[side.name] = [], []
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(side.client()) for side in sides]
        for _ in range(starts):
            elapsed, km, kc = await plain_start()
            times["plain_start"].append(elapsed)
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            for side, gw in zip(sides, clients, strict=True):
                t0 = time.perf_counter()
                kernel = await gw.start_kernel()
                times[f"{side.name}_start"].append(time.perf_counter() - t0)
                await gw.shutdown_kernel(kernel["id"])

        _, km, kc = await plain_start()
        try:
            channels = [await stack.enter_async_context(kernel_channels(gw, v1)) for gw in clients]
            for n in range(WARMUP + cells):
                plain = await plain_cell(kc)
                gateway = [await gateway_cell(ch) for ch in channels]
                if n >= WARMUP:
                    times["plain"].append(plain)
                    for side, elapsed in zip(sides, gateway, strict=True):
                        times[side.name].append(elapsed)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    return times


def _start(state: Path, replicas: int, extra: list[str]) -> RunningCluster:
    return start_cluster(state, hosts=replicas, replicas=replicas, extra_args=extra)


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
    parser.add_argument(
        "--encrypted",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run a TLS + CurveZMQ cluster against a plain one (default: with --replicas 3)",
    )
    args = parser.parse_args()
    encrypted = args.replicas == 3 if args.encrypted is None else args.encrypted

    with contextlib.ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        label = f"--hosts {args.replicas} --replicas {args.replicas}"
        sides: list[Side] = []
        try:
            if encrypted:
                print(f"nbcluster up {label} --no-curve (plain) ...", flush=True)
                sides.append(Side("gw", _start(state / "plain", args.replicas, ["--no-curve"])))
                tls = make_tls_files(state / "tls")
                secure_args = ["--certfile", str(tls.cert), "--keyfile", str(tls.key)]
                secure_args += ["--ca", str(tls.ca)]
                print(f"nbcluster up {label} --certfile ... (TLS + CurveZMQ) ...", flush=True)
                secure = _start(state / "secure", args.replicas, secure_args)
                sides.append(Side("secure", secure, tls.ca))
            else:
                print(f"nbcluster up {label} ...", flush=True)
                sides.append(Side("gw", _start(state / "plain", args.replicas, [])))
            print(f"{args.starts} starts and {args.cells} cells on each side ...", flush=True)
            t = await run(sides, args.cells, args.starts, args.v1)
        finally:
            for side in sides:
                side.cluster.stop()

    framing = "v1 binary" if args.v1 else "legacy JSON"
    plain_label = f"nbcluster gateway ({framing})" + (", plain" if encrypted else "")
    print()
    print("trivial cell (1+1) round trip, execute_reply + idle")
    print(f"  {'plain ipykernel (jupyter_client)':48s} {summary(t['plain'])}")
    print(f"  {plain_label:48s} {summary(t['gw'])}")
    if encrypted:
        secure_label = f"nbcluster gateway ({framing}), TLS + CurveZMQ"
        print(f"  {secure_label:48s} {summary(t['secure'])}")
    ratio = percentile(t["gw"], 50) / percentile(t["plain"], 50)
    target = "1.3 with one replica" if args.replicas == 1 else "1.5 with three replicas"
    print(f"  p50 ratio gateway / plain: {ratio:.2f}   (target <= {target})")
    if encrypted:
        for q in (50, 99):
            enc = percentile(t["secure"], q) / percentile(t["gw"], q)
            print(f"  p{q} ratio encrypted / unencrypted gateway: {enc:.2f}   (target <= 1.1)")
    print()
    print("kernel start to ready")
    print(f"  {'plain ipykernel (jupyter_client)':48s} {summary(t['plain_start'])}")
    label = f"nbcluster gateway ({args.replicas} replica{'s' if args.replicas > 1 else ''})"
    print(f"  {label + (', plain' if encrypted else ''):48s} {summary(t['gw_start'])}")
    if encrypted:
        print(f"  {label + ', TLS + CurveZMQ':48s} {summary(t['secure_start'])}")


if __name__ == "__main__":
    asyncio.run(main())
