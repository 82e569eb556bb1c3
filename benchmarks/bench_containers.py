"""Host scale-out time: a host provider is asked for a host → the host daemon has registered
with the gateway, on the real engine, for the ``swarm`` provider (one Swarm service per host)
and, in the same run for comparison, the ``docker`` (a container) and ``local`` (a child
process) providers.

One gateway (a local process, ``tests/cluster.py``, no auto-scaler of its own) on loopback; the
benchmark drives each provider itself, as the auto-scaler does: ``start_hosts(1)``, then polls
``GET /api/cluster/hosts`` every 20 ms until the host is connected; then ``stop_host`` and waits
for the gateway to see it go. Trials alternate between the providers so that machine noise hits
them alike. For Swarm it also reports when the service's task was first seen running (the
scheduler and the container start) and a scale-out of 3 hosts at once (every one registered).
Needs a Docker engine in a swarm (deploy/docker/engine-up.sh); builds the image if needed.

    python benchmarks/bench_containers.py [--trials 5] [--providers swarm,docker,local]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import percentile
from nbcluster.gateway import (
    DockerHostProvider,
    HostProvider,
    HostProviderConfig,
    HostTemplate,
    LocalProcessHostProvider,
    SwarmHostProvider,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster import Cluster
from tests.engine import docker_engine, nbcluster_image

POLL = 0.02


def connected(cluster: Cluster) -> set[str]:
    return set(cluster.connected_hosts())


async def until(condition: Any, timeout: float, what: str) -> float:
    """Poll ``condition`` (a blocking call, run in a thread) until true; returns when."""
    deadline = time.perf_counter() + timeout
    while not await asyncio.to_thread(condition):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        await asyncio.sleep(POLL)
    return time.perf_counter()


async def one_scale_out(
    cluster: Cluster, provider: HostProvider, engine: Any, count: int = 1
) -> dict[str, float]:
    """Seconds from the request to: the provider's answer, (swarm) every task running, every
    host registered; then the hosts are stopped again."""
    before = connected(cluster)
    t0 = time.perf_counter()
    names = await provider.start_hosts(count)
    times = {"provider answered": time.perf_counter() - t0}
    if isinstance(provider, SwarmHostProvider):

        def running() -> bool:
            for name in names:
                service = engine.services.get(provider.service_name(name))
                if not any(t["Status"]["State"] == "running" for t in service.tasks()):
                    return False
            return True

        times["task running"] = await until(running, 60, "running task") - t0
    times["host registered"] = (
        await until(lambda: set(names) <= connected(cluster), 60, "registration") - t0
    )
    for name in names:
        await provider.stop_host(name)
    await until(lambda: not (connected(cluster) - before), 60, "hosts to leave")
    return times


def report(label: str, runs: list[dict[str, float]]) -> None:
    print(f"{label}:")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(
            f"  {key:18s} p50 {percentile(values, 50):6.2f} s   min {min(values):6.2f} s"
            f"   max {max(values):6.2f} s   (n={len(values)})"
        )


async def run(cluster: Cluster, providers: dict[str, HostProvider], trials: int) -> None:
    engine = docker_engine()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in providers}
    for provider in providers.values():  # warm-up: the first start loads caches
        await one_scale_out(cluster, provider, engine)
    for i in range(trials):
        order = list(providers) if i % 2 == 0 else list(reversed(providers))
        for name in order:
            times = await one_scale_out(cluster, providers[name], engine)
            results[name].append(times)
            print(f"  {name:6s} trial {i + 1}: {times['host registered']:.2f} s", flush=True)
    print()
    for name, runs in results.items():
        report(f"{name}: 1 host, request → registered", runs)
    if "swarm" in providers:
        burst = [await one_scale_out(cluster, providers["swarm"], engine, 3) for _ in range(2)]
        report("swarm: 3 hosts at once, request → all registered", burst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--providers", default="swarm,docker,local")
    args = parser.parse_args()
    wanted = [p for p in args.providers.split(",") if p]
    logging.basicConfig(level=logging.WARNING)
    engine = docker_engine()
    image = nbcluster_image()
    gid = f"b{secrets.token_hex(5)}"
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "state", hosts=0, replicas=1)
        cluster.start_gateway()
        providers: dict[str, HostProvider] = {}
        for kind in ("swarm", "docker"):
            if kind in wanted:
                template = HostTemplate(
                    provider=kind,
                    gateway_id=gid,
                    gateway_url=cluster.url,
                    settings=HostProviderConfig(
                        kind=kind, image=image, hosts_per_node=8, stop_on_exit=True
                    ),
                    gpus_per_host=1,
                    log_level="warning",
                )
                cls = SwarmHostProvider if kind == "swarm" else DockerHostProvider
                providers[kind] = cls(template, cluster.join_token, client=engine, stop_grace=5)
        if "local" in wanted:
            providers["local"] = LocalProcessHostProvider(
                cluster.url, cluster.join_token, Path(tmp) / "state", 1, name_prefix="local"
            )
        print(
            f"image {image}; gateway {cluster.url}; providers {', '.join(providers)}; "
            f"{args.trials} trials each"
        )
        try:
            asyncio.run(run(cluster, providers, args.trials))
        finally:

            async def close() -> None:
                for provider in providers.values():
                    await provider.close()

            asyncio.run(close())
            cluster.stop()
            for secret in engine.secrets.list(filters={"label": f"nbcluster.gateway={gid}"}):
                for _ in range(100):  # a secret goes once the last task using it is gone
                    try:
                        secret.remove()
                        break
                    except Exception:
                        time.sleep(0.1)


if __name__ == "__main__":
    main()
