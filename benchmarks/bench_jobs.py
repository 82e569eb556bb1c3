"""Batch jobs: fast-job submit -> start latency (target p50 <= 50 ms) and throughput of
trivial standard jobs through the queue, with jobs kept in the state directory (embedded) and in
Redis (the server on 127.0.0.1:6379), each on a real ``nbcluster up --hosts 2``.

    .venv/bin/python benchmarks/bench_jobs.py [--fast 50] [--standard 200]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

from nbcluster.client import GatewayClient

sys.path.insert(0, str(Path(__file__).parent))
from _harness import percentile, start_cluster


async def _measure(url: str, token: str, fast: int, standard: int) -> tuple[list[float], float]:
    async with GatewayClient(url, token, timeout=300) as gw:
        await gw.submit_job({"fast": True, "command": ["true"]})  # warm-up
        latencies = []
        for _ in range(fast):
            job = await gw.submit_job({"fast": True, "command": ["true"]})
            assert job["status"] == "succeeded", job
            latencies.append(job["started"] - job["created"])
        started = time.monotonic()
        ids = [
            (await gw.submit_job({"command": ["true"], "resources": {"cpus": 0.25}}))["id"]
            for _ in range(standard)
        ]
        while True:
            jobs = await gw.list_jobs(status="succeeded")
            done = {j["id"] for j in jobs}
            if all(i in done for i in ids):
                break
            failed = await gw.list_jobs(status="failed")
            if failed:
                raise RuntimeError(f"a job failed: {failed[0]}")
            await asyncio.sleep(0.05)
        return latencies, standard / (time.monotonic() - started)


def _run(name: str, extra: list[str], fast: int, standard: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_cluster(Path(tmp), hosts=2, replicas=1, timeout=120, extra_args=extra)
        try:
            latencies, rate = asyncio.run(_measure(cluster.url, cluster.token, fast, standard))
        finally:
            cluster.stop()
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    print(
        f"{name:9s} fast job submit -> start: p50 {p50:6.1f} ms  p99 {p99:6.1f} ms (n={fast}); "
        f"{standard} trivial standard jobs: {rate:6.1f} jobs/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", type=int, default=50)
    parser.add_argument("--standard", type=int, default=200)
    args = parser.parse_args()
    _run("embedded", [], args.fast, args.standard)
    prefix = f"nbcluster-bench-{secrets.token_hex(4)}/"
    try:
        _run(
            "redis",
            ["--redis", f"redis://127.0.0.1:6379/0?prefix={prefix}"],
            args.fast,
            args.standard,
        )
    finally:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


if __name__ == "__main__":
    main()
