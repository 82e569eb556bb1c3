"""A replicated kernel that loses a replica gets a replacement, which joins the Raft group
(membership change), catches up, and can execute with all earlier state."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from nbcluster.client import GatewayClient

from ..cluster import Cluster, async_wait_for, process_gone, running_cluster, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster4(tmp_path: Any) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "state", hosts=4, replicas=3) as c:
        yield c


def _running(cluster: Cluster, kernel_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.replicas(kernel_id) if r["state"] == "running"]


async def test_three_executors_killed_in_turn_and_the_state_lives_on(cluster4: Cluster) -> None:
    async with GatewayClient(cluster4.url, cluster4.token) as gw:
        kernel = await gw.start_kernel()
        kid = kernel["id"]
        original = {r["replica_id"] for r in _running(cluster4, kid)}
        async with gw.channels(kid) as channels:
            result = await channels.execute(
                "history = [0]\ndef step():\n    history.append(len(history))"
            )
            assert result.status == "ok", result.reply
            for round_ in range(1, 4):
                result = await channels.execute("step(); print(history)")
                assert result.status == "ok", result.reply
                assert result.stream_text() == f"{list(range(round_ + 1))}\n"
                # The executor appends a cell's state to the log after its reply: a kill in
                # that moment loses the cell, by design (docs/replication.md). Kill it once the
                # state of this cell (term round_ + 1) is committed.
                term = round_ + 1

                async def committed(term: int = term) -> bool:
                    reply = await channels.request("shell", "kernel_info_request", {}, 15)
                    return int(reply["content"]["nbcluster"]["last_term"]) >= term

                await async_wait_for(committed, 15, f"the state of term {term} to be committed")
                summary = cluster4.kernel_summary(kid)
                executor = next(
                    r for r in _running(cluster4, kid) if r["replica_id"] == summary["executor"]
                )
                os.kill(executor["pid"], signal.SIGKILL)
                wait_for(lambda pid=executor["pid"]: process_gone(pid), 10, "the executor to die")

                # the gateway notices, starts a replacement, which joins and catches up
                # One snapshot per check: two reads can straddle the moment the gateway marks
                # the killed replica dead, and see three running before the replacement joined.
                def replaced(gone: str = executor["replica_id"]) -> bool:
                    running = {r["replica_id"] for r in _running(cluster4, kid)}
                    return len(running) == 3 and gone not in running

                wait_for(replaced, 30, "a replacement replica to join")
            # every original replica has been replaced by now
            assert not original & {r["replica_id"] for r in _running(cluster4, kid)}
            result = await channels.execute("step(); print(history)")
            assert result.stream_text() == f"{list(range(5))}\n", result.outputs
        metric = cluster4.metric("nbcluster_replica_replacement_seconds_count")
        assert metric is not None and metric >= 3
        await gw.shutdown_kernel(kid)
