"""Edges of a failover (issue 10, item 8), with real gateway, host and replica processes:

* a replacement that fails is retried (on another host once one has room) until the kernel
  has its three replicas again, and the cluster API and ``/metrics`` say meanwhile that it
  runs degraded;
* a cell cut off mid-run by the loss of its executor ends promptly with ``ReplicaLost``, and
  execution counts go on as a local kernel's do (it counts the interrupted cell).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from nbcluster.client import GatewayClient, KernelChannels

from ..cluster import Cluster, async_wait_for, process_gone, running_cluster
from .test_lifecycle import execute_content

pytestmark = pytest.mark.integration

#: Generous bounds for waits on a loaded 2-core machine (each ends as soon as its condition
#: holds).
SLOW = 90.0

#: An address no interface of this machine has (TEST-NET-1, RFC 5737): a host daemon told that
#: its replicas listen there starts replicas that cannot bind their sockets and exit, so every
#: replacement placed on it fails.
UNBINDABLE = "192.0.2.1"


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "state", hosts=3, replicas=3) as c:
        yield c


@pytest.fixture
def cluster4(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "state", hosts=4, replicas=3) as c:
        yield c


def _summary(cluster: Cluster, kernel_id: str) -> dict[str, Any]:
    summary: dict[str, Any] = cluster.http.get(f"/api/cluster/kernels/{kernel_id}").json()
    return summary


def _running(cluster: Cluster, kernel_id: str) -> list[dict[str, Any]]:
    return [r for r in _summary(cluster, kernel_id)["replicas"] if r["state"] == "running"]


def _executor(cluster: Cluster, kernel_id: str) -> dict[str, Any]:
    summary = _summary(cluster, kernel_id)
    [executor] = [r for r in summary["replicas"] if r["replica_id"] == summary["executor"]]
    return executor


async def _committed(channels: KernelChannels, term: int) -> None:
    """Wait until the serving replica has applied the state of ``term``."""

    async def applied() -> bool:
        reply = await channels.request("shell", "kernel_info_request", {}, 15)
        return int(reply["content"]["nbcluster"]["last_term"]) >= term

    await async_wait_for(applied, SLOW, f"the state of term {term} to be committed")


def _text(result: Any) -> str:
    (out,) = result.of_type("execute_result")
    return str(out["content"]["data"]["text/plain"])


def _gauge(cluster: Cluster, name: str) -> float | None:
    return cluster.metric(name)


async def test_a_failed_replacement_is_retried_until_the_kernel_has_three_replicas(
    cluster3: Cluster,
) -> None:
    async with GatewayClient(cluster3.url, cluster3.token) as gw:
        kid = (await gw.start_kernel())["id"]
        summary = _summary(cluster3, kid)
        assert (summary["replicas_wanted"], summary["replicas_running"]) == (3, 3)
        assert summary["degraded"] is False and summary["repair"] is None
        assert _gauge(cluster3, "nbcluster_kernels_degraded") == 0

        # The fourth host can take replicas, but every one it starts fails.
        cluster3.start_host("host-refusing", address=UNBINDABLE)
        await async_wait_for(
            lambda: "host-refusing" in cluster3.connected_hosts(), SLOW, "the host to connect"
        )
        async with gw.channels(kid) as channels:
            assert (await channels.execute("x = 41", SLOW)).status == "ok"
            await _committed(channels, 1)
            # Losing the executor's whole host leaves the refusing host as the only one
            # without a replica of this kernel: the replacement goes there and fails.
            lost = _executor(cluster3, kid)
            cluster3.kill_host(lost["host"])
            await async_wait_for(lambda: process_gone(lost["pid"]), SLOW, "the executor to die")

            def failed_and_retrying() -> bool:
                repair = _summary(cluster3, kid)["repair"]
                return repair is not None and repair["failed_attempts"] >= 1

            await async_wait_for(failed_and_retrying, SLOW, "a replacement attempt to fail")
            summary = _summary(cluster3, kid)
            assert summary["degraded"] is True
            assert (summary["replicas_wanted"], summary["replicas_running"]) == (3, 2)
            assert "host-refusing" in summary["repair"]["last_error"]
            assert _gauge(cluster3, "nbcluster_kernels_degraded") == 1
            failures = _gauge(cluster3, "nbcluster_replica_replacement_failures_total")
            assert failures is not None and failures >= 1
            # Degraded, the kernel serves on its two other replicas.
            result = await channels.execute("x + 1", SLOW)
            assert result.status == "ok", result.reply
            assert _text(result) == "42"

            # A host that can take the replica registers: the next attempt goes there (not to
            # the refusing host again) without waiting out the backoff's remainder.
            cluster3.start_host("host-4")
            await async_wait_for(
                lambda: len(_running(cluster3, kid)) == 3, SLOW, "the kernel to get 3 replicas"
            )
            summary = _summary(cluster3, kid)
            assert summary["degraded"] is False and summary["repair"] is None
            assert summary["replicas_running"] == 3
            assert "host-4" in {r["host"] for r in _running(cluster3, kid)}
            assert "host-refusing" not in {r["host"] for r in _running(cluster3, kid)}
            assert _gauge(cluster3, "nbcluster_kernels_degraded") == 0
            # Each retry is logged with its reason (the log is wrapped into columns).
            log = " ".join((cluster3.log_dir / "gateway.log").read_text(errors="replace").split())
            assert "replacement attempt 1 failed (replica" in log and "retrying in" in log

            # The new replica is a full member: it has the state and the group commits with
            # it after another loss.
            await _committed(channels, 2)
            executor = _executor(cluster3, kid)
            os.kill(executor["pid"], signal.SIGKILL)
            await async_wait_for(lambda: process_gone(executor["pid"]), SLOW, "the executor to die")
            result = await channels.execute("x + 2", SLOW)
            assert result.status == "ok", result.reply
            assert _text(result) == "43"
        await gw.shutdown_kernel(kid)


SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(30)\nnever = 1"
BEFORE = ["x = 1", "y = 2"]
AFTER = "x + y"


async def _local_counts() -> tuple[int, int]:
    """On a plain local ipykernel: the execution counts of the interrupted cell and of the cell
    after it, for the same cells as the test below (interrupting is what cuts a local cell
    off mid-run)."""
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=SLOW)
        for code in BEFORE:
            reply = await kc.execute_interactive(code, timeout=SLOW)
            assert reply["content"]["status"] == "ok"
        msg_id = kc.execute(SLEEPER)
        while True:
            msg = await kc.get_iopub_msg(timeout=SLOW)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                break
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=SLOW)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        after = await kc.execute_interactive(AFTER, timeout=SLOW)
        if after["content"]["status"] == "aborted":
            # ipykernel 7 aborts a request that arrives while it still aborts its queue after
            # an error (stop_on_error; 4 times in 10 on this machine): sent once more.
            after = await kc.execute_interactive(AFTER, timeout=SLOW)
        return int(reply["content"]["execution_count"]), int(after["content"]["execution_count"])
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_a_cell_cut_off_mid_run_ends_with_replica_lost_and_counts_stay_local(
    cluster4: Cluster,
) -> None:
    local_cut, local_after = await _local_counts()
    async with GatewayClient(cluster4.url, cluster4.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            for code in BEFORE:
                assert (await channels.execute(code, SLOW)).status == "ok"
            await _committed(channels, len(BEFORE))
            msg_id = await channels.send("shell", "execute_request", execute_content(SLEEPER))
            deadline = time.monotonic() + SLOW
            while True:  # until the cell runs user code on its executor
                msg = await channels.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
                if msg["msg_type"] == "stream" and "started" in msg["content"]["text"]:
                    break
            executor = _executor(cluster4, kid)
            os.kill(executor["pid"], signal.SIGKILL)

            async def reply_and_idle() -> list[dict[str, Any]]:
                messages: list[dict[str, Any]] = []
                while not any(
                    m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                    for m in messages
                ) or not any(m["msg_type"] == "execute_reply" for m in messages):
                    messages.append(await channels.next_for(msg_id, SLOW))
                return messages

            # Bounded well below the ~10 s proposal timeout after which the cell used to end
            # with ReplicaGroupUnavailable: the survivor knows at once that the lost replica
            # had won the cell's term.
            messages = await asyncio.wait_for(reply_and_idle(), 9.0)
            [reply] = [m["content"] for m in messages if m["msg_type"] == "execute_reply"]
            assert reply["status"] == "error"
            assert reply["ename"] == "ReplicaLost", reply
            assert f"exited with code {-signal.SIGKILL}" in reply["evalue"]
            assert reply["execution_count"] == local_cut
            errors = [m["content"]["ename"] for m in messages if m["msg_type"] == "error"]
            assert errors == ["ReplicaLost"]

            result = await channels.execute(AFTER, SLOW)
            assert result.status == "ok", (result.reply, result.stream_text("stderr"))
            assert _text(result) == "3"
            assert result.reply["execution_count"] == local_after
            (shown,) = result.of_type("execute_input")
            assert shown["content"]["execution_count"] == local_after
            # The cell cut off left no state to wait for: no warning about a missing one.
            assert result.stream_text("stderr") == ""
            result = await channels.execute("'never' in dir()", SLOW)
            assert _text(result) == "False"
            assert result.reply["execution_count"] == local_after + 1
        await gw.shutdown_kernel(kid)
