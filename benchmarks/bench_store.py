"""Object store throughput: put/get of a 100 MB object through each nbcluster backend against
the raw client doing the same in the same run (plain file write/read, redis-py SET/GET in 8 MB
chunks, boto3 put_object/get_object on a moto server), alternating, and the ratio
(raw time / our time: 1.0 means as fast as the raw client; target >= 0.8).

    .venv/bin/python benchmarks/bench_store.py [--size-mb 100] [--rounds 5] [--backends local,redis,s3]

Redis is the server on 127.0.0.1:6379 (keys under a prefix of this run, removed at the end);
S3 is a moto server this script starts on a free port.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nbcluster.store import ObjectStore, open_store

CHUNK = 8 * 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _time(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _compare(
    name: str,
    ours: ObjectStore,
    raw_put: Callable[[bytes], None],
    raw_get: Callable[[], bytes],
    data: bytes,
    rounds: int,
) -> None:
    times: dict[str, list[float]] = {"put": [], "get": [], "raw put": [], "raw get": []}
    for _ in range(rounds):
        times["raw put"].append(_time(lambda: raw_put(data)))
        times["put"].append(_time(lambda: ours.put("bench/object", data)))
        started = time.perf_counter()
        raw_copy = raw_get()
        times["raw get"].append(time.perf_counter() - started)
        started = time.perf_counter()
        our_copy = ours.get("bench/object")
        times["get"].append(time.perf_counter() - started)
        assert raw_copy == data and our_copy == data
    ours.delete("bench/object")
    mb = len(data) / 2**20
    print(f"\n{name}: {mb:.0f} MB object, median of {rounds}")
    for op in ("put", "get"):
        ours_s, raw_s = _median(times[op]), _median(times[f"raw {op}"])
        print(
            f"  {op}: nbcluster {ours_s * 1000:8.1f} ms ({mb / ours_s:7.1f} MB/s)   "
            f"raw {raw_s * 1000:8.1f} ms ({mb / raw_s:7.1f} MB/s)   ratio {raw_s / ours_s:.2f}"
        )


def bench_local(data: bytes, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.bin"

        def raw_put(payload: bytes) -> None:
            with raw_path.open("wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

        _compare(
            "local directory (fsync on both sides)",
            open_store((Path(tmp) / "store").as_uri()),
            raw_put,
            raw_path.read_bytes,
            data,
            rounds,
        )


def bench_redis(data: bytes, rounds: int) -> None:
    import redis

    prefix = f"nbcluster-bench-{secrets.token_hex(4)}/"
    client = redis.Redis(host="127.0.0.1", port=6379)
    ours = open_store(f"redis://127.0.0.1:6379/0?prefix={prefix}")

    def raw_put(payload: bytes) -> None:
        view = memoryview(payload)
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(payload), CHUNK):
            pipe.set(f"{prefix}raw/{i // CHUNK}", view[i : i + CHUNK])
        pipe.execute()

    def raw_get() -> bytes:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(data), CHUNK):
            pipe.get(f"{prefix}raw/{i // CHUNK}")
        return b"".join(pipe.execute())

    try:
        _compare("redis (127.0.0.1:6379)", ours, raw_put, raw_get, data, rounds)
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def bench_s3(data: bytes, rounds: int) -> None:
    import boto3
    import httpx

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        ours = open_store(f"s3://bench/nbcluster?endpoint_url={endpoint}")

        def raw_put(payload: bytes) -> None:
            client.put_object(Bucket="bench", Key="raw.bin", Body=payload)

        def raw_get() -> bytes:
            body: bytes = client.get_object(Bucket="bench", Key="raw.bin")["Body"].read()
            return body

        _compare("s3 (moto server on loopback)", ours, raw_put, raw_get, data, rounds)
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="local,redis,s3")
    args = parser.parse_args()
    data = os.urandom(args.size_mb * 2**20)
    runners = {"local": bench_local, "redis": bench_redis, "s3": bench_s3}
    for name in args.backends.split(","):
        runners[name.strip()](data, args.rounds)


if __name__ == "__main__":
    main()
