"""Replicated kernels end to end: three replicas on three hosts, one executor per cell, state
synchronised through the Raft log, and failover when the executor or its host dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster.client import GatewayClient, KernelChannels

from ..cluster import Cluster, async_wait_for, process_gone, running_cluster, wait_for

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


# -- helpers for the tests below ------------------------------------------------------------

QUICK = 15.0


def _text(result: Any) -> str:
    """The ``text/plain`` of a cell's single execute_result."""
    (out,) = result.of_type("execute_result")
    return str(out["content"]["data"]["text/plain"])


def _stderr_warnings(result: Any) -> list[str]:
    """Every stderr stream message of a cell (nbcluster's warnings are such messages)."""
    return [
        o["content"]["text"] for o in result.of_type("stream") if o["content"]["name"] == "stderr"
    ]


async def _kill_executor(
    cluster: Cluster, kernel_id: str, channels: KernelChannels, term: int, host: bool = False
) -> dict[str, Any]:
    """``kill -9`` the executing replica (``host``: its whole host daemon) once the state of
    ``term`` (the last cell run) is committed; return once the gateway has declared it dead.

    The executor appends a cell's state to the log after its reply, off the critical path: a
    kill in that moment loses the cell's state, by design (docs/replication.md, "Failures").
    These tests check what survives a failover, so they wait until it was replicated.
    """

    async def committed() -> bool:
        return await _last_term(channels) >= term

    await async_wait_for(committed, 60, f"the state of term {term} to be committed")
    executor = _executor(cluster, kernel_id)
    if host:
        cluster.kill_host(executor["host"])
    else:
        os.kill(executor["pid"], signal.SIGKILL)
    await async_wait_for(lambda: process_gone(executor["pid"]), 10, "the executor to die")

    def noticed() -> bool:
        (replica,) = [
            r for r in cluster.replicas(kernel_id) if r["replica_id"] == executor["replica_id"]
        ]
        return bool(replica["state"] == "dead")

    await async_wait_for(noticed, QUICK, "the gateway to notice the executor died")
    return executor


async def _last_term(channels: KernelChannels) -> int:
    """The last term whose state the serving replica has applied (from its kernel_info)."""
    reply = await channels.request("shell", "kernel_info_request", {}, QUICK)
    return int(reply["content"]["nbcluster"]["last_term"])


def _execute_content(code: str) -> dict[str, Any]:
    return {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }


async def _until_reply_and_idle(
    channels: KernelChannels, msg_id: str, timeout: float
) -> list[dict[str, Any]]:
    """Every message parented to ``msg_id`` until its execute_reply and closing idle came."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    replied = idle = False
    while not (replied and idle):
        msg = await channels.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
        messages.append(msg)
        replied = replied or msg["msg_type"] == "execute_reply"
        idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
    return messages


# -- interrupt, restart ---------------------------------------------------------------------


async def test_interrupt_stops_the_running_cell_and_keeps_the_state(cluster3: Cluster) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            assert (await _run(channels, DEFINE)).status == "ok"
            executor = _executor(cluster3, kid)

            msg_id = await channels.send(
                "shell",
                "execute_request",
                _execute_content(
                    "import time\nhalf_done = 'set before the sleep'\n"
                    "print('sleeping', flush=True)\ntime.sleep(60)\nnever = 1"
                ),
            )
            deadline = time.monotonic() + QUICK
            while True:  # wait until the cell is really running user code
                msg = await channels.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
                if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                    break
            started = time.monotonic()
            await gw.interrupt_kernel(kid)
            messages = await _until_reply_and_idle(channels, msg_id, 10)
            assert time.monotonic() - started < 10
            (reply,) = [m for m in messages if m["msg_type"] == "execute_reply"]
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert [m["content"]["ename"] for m in messages if m["msg_type"] == "error"] == [
                "KeyboardInterrupt"
            ]

            # Only the executor was interrupted: every replica is still running.
            assert all(r["state"] == "running" for r in _replicas(cluster3, kid))
            assert _executor(cluster3, kid)["replica_id"] == executor["replica_id"]
            result = await _run(channels, CHECK + "\nprint(half_done, 'never' in dir())")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "state ok\nset before the sleep False\n"

            # The standby replicas got the same state, the interrupted cell's effect included.
            await _kill_executor(cluster3, kid, channels, 3)
            result = await _run(channels, CHECK + "\nprint(half_done, 'never' in dir())")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "state ok\nset before the sleep False\n"
        await gw.shutdown_kernel(kid)


async def test_restart_replaces_all_three_replicas_and_clears_the_state(
    cluster3: Cluster,
) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            assert (await _run(channels, DEFINE)).status == "ok"
            assert (await _run(channels, "x + 1")).status == "ok"
            old = _replicas(cluster3, kid)
            old_pids = {r["pid"] for r in old}

            model = await gw.restart_kernel(kid)
            assert model["id"] == kid
            assert model["execution_state"] == "idle"

            new = [r for r in _replicas(cluster3, kid) if r["state"] == "running"]
            assert len(new) == 3
            assert len({r["host"] for r in new}) == 3
            new_pids = {r["pid"] for r in new}
            assert len(new_pids) == 3
            assert not new_pids & old_pids
            await async_wait_for(
                lambda: all(process_gone(pid) for pid in old_pids), QUICK, "old replicas to exit"
            )

            # Fresh state on the executor ...
            result = await _run(channels, "x")
            assert result.status == "error"
            assert result.reply["ename"] == "NameError"
            assert result.reply["execution_count"] == 1
            result = await _run(channels, "y = 5\ny * 2")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "10"
            assert result.reply["execution_count"] == 2
            # ... and on the others: after a failover the old names are still gone.
            await _kill_executor(cluster3, kid, channels, 2)
            result = await _run(channels, "print('x' in dir(), 'data' in dir(), y)")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "False False 5\n"
        await gw.shutdown_kernel(kid)


# -- what the state synchronisation carries --------------------------------------------------


async def test_an_unpicklable_variable_is_named_once_and_the_rest_survives(
    cluster3: Cluster,
) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            result = await _run(
                channels,
                # A held lock and a generator in progress cannot be copied (a free lock and a
                # generator not started can: tests/unit/test_sync*.py).
                "import threading\nlock = threading.Lock()\nlock.acquire()\n"
                "gen = (i for i in range(3))\nnext(gen)\nkept = [1, 2, 3]",
            )
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            (warning,) = _stderr_warnings(result)
            assert warning.startswith("[nbcluster]") and "cannot be copied" in warning
            assert "gen" in warning and "lock" in warning
            assert "kept" not in warning

            # Cells that leave them alone say nothing more, also when they change other state.
            for code in ("kept.append(4)", "other = 'fine'", "len(kept)"):
                result = await _run(channels, code)
                assert result.status == "ok", (result.reply, result.stream_text("stderr"))
                assert _stderr_warnings(result) == [], code
            # Using it is fine on the executor (it is only not copied).
            result = await _run(channels, "lock.locked(), next(gen)")
            assert _text(result) == "(True, 1)"
            assert _stderr_warnings(result) == []

            await _kill_executor(cluster3, kid, channels, 5)
            result = await _run(channels, "print(kept, other, 'lock' in dir(), 'gen' in dir())")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "[1, 2, 3, 4] fine False False\n"
            # A new unpicklable value is reported by the new executor.
            result = await _run(channels, "lock2 = threading.Lock()\nlock2.acquire()")
            (warning,) = _stderr_warnings(result)
            assert "lock2" in warning
        await gw.shutdown_kernel(kid)


async def test_a_large_value_goes_through_the_store_and_survives_kill_9(
    cluster3: Cluster,
) -> None:
    store = cluster3.state_dir / "store"

    def objects() -> list[Path]:
        if not store.exists():
            return []
        return [p for p in store.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]

    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            before = set(objects())
            code = "big = bytes(range(256)) * 12_000\nsmall = 7\nlen(big)"
            result = await _run(channels, code)
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "3072000"
            new = [p for p in objects() if p not in before]
            assert new, f"nothing written under {store}"
            assert max(p.stat().st_size for p in new) > 3_000_000

            await _kill_executor(cluster3, kid, channels, 1)
            result = await _run(channels, "(len(big), big == bytes(range(256)) * 12_000, small)")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "(3072000, True, 7)"
        await gw.shutdown_kernel(kid)


async def test_execution_counts_continue_across_a_failover(cluster3: Cluster) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            # State-changing cells and cells that change nothing, as notebooks mix them.
            cells = ["x = 1", "x + 1", "print(x)", "x = 2", "x * 10", "x * 100"]
            for n, code in enumerate(cells, start=1):
                result = await _run(channels, code)
                assert result.status == "ok", (result.reply, result.stream_text("stderr"))
                assert result.reply["execution_count"] == n
            (executed,) = [
                o for o in result.of_type("execute_input") if o["content"]["code"] == cells[-1]
            ]
            assert executed["content"]["execution_count"] == len(cells)

            await _kill_executor(cluster3, kid, channels, 6)
            result = await _run(channels, "x + 5")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "7"
            assert result.reply["execution_count"] == len(cells) + 1, result.reply
            (inp,) = result.of_type("execute_input")
            assert inp["content"]["execution_count"] == len(cells) + 1
            (out,) = result.of_type("execute_result")
            assert out["content"]["execution_count"] == len(cells) + 1
            result = await _run(channels, "x")
            assert result.reply["execution_count"] == len(cells) + 2
        await gw.shutdown_kernel(kid)


# -- gateway restart ----------------------------------------------------------------------------


async def test_gateway_restart_keeps_the_state_and_the_terms(cluster3: Cluster) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            assert (await _run(channels, DEFINE)).status == "ok"
            assert (await _run(channels, "x = x + 1")).status == "ok"
            assert (await _run(channels, "x")).status == "ok"

            async def applied_three() -> bool:
                return await _last_term(channels) == 3

            await async_wait_for(applied_three, QUICK, "term 3 to be applied")
        pids = {r["pid"] for r in _replicas(cluster3, kid)}

    cluster3.kill_gateway()
    assert not [pid for pid in pids if process_gone(pid)]
    cluster3.start_gateway()
    await async_wait_for(
        lambda: sorted(cluster3.connected_hosts()) == sorted(cluster3.hosts),
        QUICK,
        "the hosts to reconnect",
    )
    await async_wait_for(
        lambda: all(r["state"] == "running" for r in cluster3.replicas(kid)),
        QUICK,
        "the replicas to be re-attached",
    )
    assert {r["pid"] for r in cluster3.replicas(kid)} == pids

    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        async with gw.channels(kid) as channels:
            result = await _run(channels, "x + 1")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "43"
            result = await _run(channels, "x = 41\n" + CHECK)
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "state ok\n"

            async def applied_five() -> bool:
                return await _last_term(channels) == 5

            await async_wait_for(applied_five, QUICK, "terms 4 and 5 to be applied")
            # And a failover after the gateway restart still finds the state.
            await _kill_executor(cluster3, kid, channels, 5)
            result = await _run(channels, "x * 2")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "82"
        await gw.shutdown_kernel(kid)


async def test_executor_dying_between_its_reply_and_idle_does_not_leave_the_cell_busy(
    cluster3: Cluster,
) -> None:
    """The executor replies, then captures the cell's state (here: hashing and storing a
    large value, which takes a while), then reports idle. If it dies in between, clients that
    wait for the idle status (JupyterLab, nbclient, nbcluster.client) must still get one."""
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            assert (await _run(channels, "x = 1")).status == "ok"
            executor = _executor(cluster3, kid)
            msg_id = await channels.send(
                "shell", "execute_request", _execute_content("big = bytes(100_000_000)")
            )
            deadline = time.monotonic() + QUICK
            while True:
                msg = await channels.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
                assert msg["msg_type"] != "status" or msg["content"]["execution_state"] != "idle"
                if msg["msg_type"] == "execute_reply":
                    break
            os.kill(executor["pid"], signal.SIGKILL)  # while it captures the 100 MB value
            await async_wait_for(lambda: process_gone(executor["pid"]), 10, "the executor to die")

            async def idle() -> dict[str, Any]:
                while True:
                    msg = await channels.next_for(msg_id, QUICK)
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        return msg

            await asyncio.wait_for(idle(), 10)
            await async_wait_for(
                lambda: cluster3.kernel_summary(kid)["execution_state"] == "idle",
                QUICK,
                "the kernel to be idle",
            )
            result = await _run(channels, "x + 1")
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "2"
        await gw.shutdown_kernel(kid)


ARRAYS_AND_MODELS = """
import numpy as np
import torch

rng = np.random.default_rng(7)
arr = rng.random(25 * 2**20)  # 200 MB of float64
arr_sum = float(arr.sum())
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
probe = torch.ones(1, 8)
expected = model(probe).detach().clone()
weights = {k: v.clone() for k, v in model.state_dict().items()}
"""

ARRAYS_AND_MODELS_CHECK = """
assert arr.shape == (25 * 2**20,) and arr.dtype == np.float64
assert float(arr.sum()) == arr_sum
assert torch.equal(model(probe).detach(), expected)
assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
arr[0] = 1.0  # still writable
print("arrays ok")
"""


async def test_a_200_mb_array_and_a_torch_model_survive_losing_the_executors_host(
    cluster3: Cluster,
) -> None:
    store = cluster3.state_dir / "store"
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            result = await channels.execute(ARRAYS_AND_MODELS, 180)
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            sizes = [p.stat().st_size for p in store.rglob("*") if p.is_file()]
            assert max(sizes) > 200 * 2**20  # the array went to the store, not the log
            executor = await _kill_executor(cluster3, kid, channels, 1, host=True)
            result = await channels.execute(ARRAYS_AND_MODELS_CHECK, 180)
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert result.stream_text() == "arrays ok\n"
            assert _executor(cluster3, kid)["host"] != executor["host"]
        await gw.shutdown_kernel(kid)
