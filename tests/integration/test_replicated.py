"""Replicated kernels end to end: three replicas on three hosts, one executor per cell, state
synchronised through the Raft log, and failover when the executor or its host dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from nbcluster.client import GatewayClient, KernelChannels

from ..cluster import Cluster, process_gone, running_cluster, wait_for

pytestmark = pytest.mark.integration

DEFINE = """
import json, collections
from collections import OrderedDict as OD

x = 41
data = {"a": [1, 2, 3]}

def double(v):
    return 2 * v

def uses_global():
    return x + 1

class Point:
    def __init__(self, a, b):
        self.a, self.b = a, b
    def norm1(self):
        return abs(self.a) + abs(self.b)

p = Point(3, -4)
"""

CHECK = """
assert x == 41, x
assert data["a"] == [1, 2, 3]
assert double(21) == 42
assert uses_global() == 42
assert isinstance(p, Point) and p.norm1() == 7
assert json.dumps(OD(a=1)) == '{"a": 1}'
assert collections.Counter("aab")["a"] == 2
print("state ok")
"""


@pytest.fixture
def cluster3(tmp_path: Any) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "state", hosts=4, replicas=3) as c:
        yield c


def _replicas(cluster: Cluster, kernel_id: str) -> list[dict[str, Any]]:
    replicas: list[dict[str, Any]] = cluster.kernel_summary(kernel_id)["replicas"]  # type: ignore[assignment]
    return replicas


def _executor(cluster: Cluster, kernel_id: str) -> dict[str, Any]:
    summary = cluster.kernel_summary(kernel_id)
    return next(r for r in _replicas(cluster, kernel_id) if r["replica_id"] == summary["executor"])


async def _run(channels: KernelChannels, code: str) -> Any:
    result = await channels.execute(code, timeout=60)
    return result


async def test_three_replicas_on_distinct_hosts_and_one_reply_per_cell(cluster3: Cluster) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kernel = await gw.start_kernel()
        replicas = _replicas(cluster3, kernel["id"])
        assert len(replicas) == 3
        assert len({r["host"] for r in replicas}) == 3
        assert all(r["state"] == "running" for r in replicas)
        async with gw.channels(kernel["id"]) as channels:
            for n in range(1, 4):
                result = await _run(channels, f"print('cell', {n}); {n} * 10")
                assert result.status == "ok", result.reply
                assert result.stream_text() == f"cell {n}\n"
                assert [
                    o["content"]["data"]["text/plain"] for o in result.of_type("execute_result")
                ] == [str(n * 10)]
                assert len(result.of_type("execute_input")) == 1
                assert result.reply["execution_count"] == n
            # nothing else (yield replies, standby status) arrived for these cells
            assert channels.unrouted.empty() or all(
                m["msg_type"] == "status"
                for m in list(channels.unrouted._queue)  # type: ignore[attr-defined]
            )
        await gw.shutdown_kernel(kernel["id"])


async def _failover(cluster: Cluster, kill: str) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kernel = await gw.start_kernel()
        kid = kernel["id"]
        async with gw.channels(kid) as channels:
            result = await _run(channels, DEFINE)
            assert result.status == "ok", result.reply
            result = await _run(channels, CHECK)
            assert result.stream_text() == "state ok\n", result.outputs
            executor = _executor(cluster, kid)
            if kill == "replica":
                os.kill(executor["pid"], signal.SIGKILL)
            else:
                cluster.kill_host(executor["host"])
            wait_for(lambda: process_gone(executor["pid"]), 10, "the executor to die")
            wait_for(
                lambda: (
                    next(
                        r
                        for r in _replicas(cluster, kid)
                        if r["replica_id"] == executor["replica_id"]
                    )["state"]
                    == "dead"
                ),
                15,
                "the gateway to notice",
            )
            result = await _run(channels, CHECK + "\nx = 100")
            assert result.status == "ok", result.reply
            assert result.stream_text() == "state ok\n"
            new_executor = _executor(cluster, kid)
            assert new_executor["replica_id"] != executor["replica_id"]
            result = await _run(channels, "x + 1")
            assert result.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "101"
        await gw.shutdown_kernel(kid)


async def test_state_survives_kill_9_of_the_executing_replica(cluster3: Cluster) -> None:
    await _failover(cluster3, "replica")


async def test_state_survives_losing_the_executors_host(cluster3: Cluster) -> None:
    await _failover(cluster3, "host")
