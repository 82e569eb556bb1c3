"""Kernel start-to-ready with replicas as containers vs as processes, in the same run.

One cluster (a gateway and three host daemons with ``--container-runtime docker``) offers two
kernelspecs: ``python3`` (replicas are processes) and ``in-image`` (replicas are containers of
the nbcluster image). Starts alternate between them, so that machine noise hits both alike;
each start is ``POST /api/kernels`` until the kernel answers a ``kernel_info_request`` on its
channels, then the kernel is shut down. Needs a Docker engine (deploy/docker/engine-up.sh) and
Redis on 127.0.0.1:6379 (the containers' object store).

    python benchmarks/bench_kernel_containers.py [--starts 5] [--replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from _harness import percentile
from nbcluster.client import GatewayClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster import Cluster, wait_for
from tests.engine import docker_engine, nbcluster_image


async def one_start(gw: GatewayClient, name: str) -> float:
    t0 = time.perf_counter()
    kernel = await gw.start_kernel(name)
    async with gw.channels(kernel["id"]) as channels:
        await channels.request("shell", "kernel_info_request", {}, 60)
    elapsed = time.perf_counter() - t0
    await gw.shutdown_kernel(kernel["id"])
    return elapsed


async def measure(cluster: Cluster, starts: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"python3": [], "in-image": []}
    async with GatewayClient(cluster.url, cluster.token) as gw:
        for name in times:  # warm-up: the first container start loads the image's layers
            await one_start(gw, name)
        for i in range(starts):
            order = ("python3", "in-image") if i % 2 == 0 else ("in-image", "python3")
            for name in order:
                times[name].append(await one_start(gw, name))
                print(f"  {name:9s} start {i + 1}: {times[name][-1]:.2f} s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--replicas", type=int, choices=(1, 3), default=3)
    args = parser.parse_args()
    engine = docker_engine()
    image = nbcluster_image()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = root / "kernelspecs" / "in-image"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
                    "display_name": "in image",
                    "language": "python",
                    "metadata": {"nbcluster": {"image": image}},
                }
            )
        )
        store = f"redis://127.0.0.1:6379/0?prefix=bench-containers-{secrets.token_hex(4)}/"
        cluster = Cluster(
            root / "state",
            hosts=args.replicas,
            replicas=args.replicas,
            gateway_args=["--kernelspec-dir", str(root / "kernelspecs"), "--store", store],
            host_args=["--container-runtime", "docker"],
        )
        try:
            cluster.start()
            wait_for(lambda: len(cluster.connected_hosts()) == args.replicas, 30, "hosts")
            times = asyncio.run(measure(cluster, args.starts))
        finally:
            cluster.stop()
            for container in engine.containers.list(
                all=True, filters={"label": "nbcluster.role=replica"}
            ):
                if container.labels.get("nbcluster.host", "").startswith("host-"):
                    container.remove(force=True)
    processes = percentile(times["python3"], 50)
    containers = percentile(times["in-image"], 50)
    print(f"\nkernel start-to-ready, {args.replicas} replica(s), p50 of {args.starts}:")
    print(f"  replicas as processes : {processes:.2f} s")
    print(f"  replicas as containers: {containers:.2f} s")
    print(f"  containers / processes: {containers / processes:.2f}")


if __name__ == "__main__":
    main()
