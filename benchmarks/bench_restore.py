"""Time to restore a kernel that lost all three replicas, with N MB of state, from each object
store backend: ``kill -9`` of every replica to the right answer of the next cell.

    .venv/bin/python benchmarks/bench_restore.py [--size-mb 1024] [--backends local,redis,s3]

Runs the real ``nbcluster up --hosts 3 --store URL`` per backend (Redis: the server on
127.0.0.1:6379 under a prefix of this run; S3: a moto server started here). The state is one
random ``bytes`` value plus a few small variables; the next cell checks its digest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from nbcluster.client import GatewayClient

sys.path.insert(0, str(Path(__file__).parent))
from _harness import start_cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _measure(url: str, token: str, size_mb: int) -> tuple[float, float]:
    async with GatewayClient(url, token, timeout=600) as gw:
        kernel = await gw.start_kernel()
        kid = kernel["id"]
        async with gw.channels(kid) as channels:
            setup = await channels.execute(
                f"import hashlib, os\nblob = os.urandom({size_mb} * 2**20)\n"
                "digest = hashlib.sha256(blob).hexdigest()\nsmall = list(range(100))",
                900,
            )
            assert setup.status == "ok", setup.reply
            started = time.monotonic()
            await gw.checkpoint_kernel(kid)
            checkpoint_s = time.monotonic() - started
            listed = await gw.cluster_kernels()
            replicas = next(r for r in listed if r["id"] == kid)["replicas"]
            pids = [r["pid"] for r in replicas if r["state"] == "running"]
            started = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            deadline = started + 900
            while True:
                result = await channels.execute(
                    "print(hashlib.sha256(blob).hexdigest() == digest, len(small))", 900
                )
                if result.status == "ok":
                    assert result.stream_text() == "True 100\n", result.stream_text()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not restored: {result.reply}")
                await asyncio.sleep(0.05)
            restore_s = time.monotonic() - started
        await gw.shutdown_kernel(kid)
    return checkpoint_s, restore_s


def _run(name: str, store_url: str, size_mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_cluster(
            Path(tmp), hosts=3, replicas=3, timeout=120, extra_args=["--store", store_url]
        )
        try:
            checkpoint_s, restore_s = asyncio.run(_measure(cluster.url, cluster.token, size_mb))
        finally:
            cluster.stop()
    print(
        f"{name:6s} {size_mb} MB of state: checkpoint {checkpoint_s:6.2f} s, "
        f"kill -9 of all 3 replicas -> right answer {restore_s:6.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--backends", default="local,redis,s3")
    args = parser.parse_args()
    for name in args.backends.split(","):
        name = name.strip()
        if name == "local":
            with tempfile.TemporaryDirectory() as store:
                _run(name, Path(store).as_uri(), args.size_mb)
        elif name == "redis":
            prefix = f"nbcluster-bench-{secrets.token_hex(4)}/"
            try:
                _run(name, f"redis://127.0.0.1:6379/0?prefix={prefix}", args.size_mb)
            finally:
                import redis

                client = redis.Redis(host="127.0.0.1", port=6379)
                for key in client.scan_iter(match=f"{prefix}*"):
                    client.delete(key)
        elif name == "s3":
            port = _free_port()
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            endpoint = f"http://127.0.0.1:{port}"
            try:
                for _ in range(300):
                    try:
                        httpx.get(endpoint, timeout=1)
                        break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                import boto3

                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                    Bucket="bench"
                )
                _run(name, f"s3://bench/nbcluster?endpoint_url={endpoint}", args.size_mb)
            finally:
                server.terminate()
                server.wait(10)
        else:
            raise SystemExit(f"unknown backend {name!r}")


if __name__ == "__main__":
    main()
