"""A kernel that loses all three replicas is restored from its checkpoint and the store's log
tail; checkpoints can be asked for."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nbcluster.client import GatewayClient, GatewayError
from nbcluster.store import LocalDirectoryStore

from ..cluster import async_wait_for, process_gone, running_cluster

pytestmark = pytest.mark.integration


async def test_a_kernel_that_lost_every_replica_is_restored_from_the_store(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with running_cluster(state, hosts=3, replicas=3) as c:
        store = LocalDirectoryStore(state / "store")
        async with GatewayClient(c.url, c.token) as gw:
            kernel = await gw.start_kernel()
            kid = kernel["id"]
            async with gw.channels(kid) as channels:
                setup = await channels.execute(
                    "import hashlib, os\n"
                    "big = os.urandom(3 * 2**20)\n"
                    "digest = hashlib.sha256(big).hexdigest()\n"
                    "def double(v):\n    return 2 * v\n"
                    "a = 1",
                    60,
                )
                assert setup.status == "ok", setup.reply
                checkpoint = await gw.checkpoint_kernel(kid)
                assert checkpoint["term"] >= 1 and checkpoint["size"] > 0
                assert [i.key for i in store.list(f"kernels/{kid}/checkpoint")] == [
                    f"kernels/{kid}/checkpoints/{checkpoint['term']:012d}"
                ]
                # After the checkpoint: cells that only the store's log tail remembers.
                assert (await channels.execute("a = double(21)", 60)).status == "ok"
                assert (await channels.execute("b = 'after'", 60)).status == "ok"
                # (The first checkpoint deletes no log entry: the log is its fallback.)
                after = f"kernels/{kid}/log/{checkpoint['term']:012d}"
                await async_wait_for(
                    lambda: (
                        len([i for i in store.list(f"kernels/{kid}/log/") if i.key > after]) >= 2
                    ),
                    30,
                    "the log tail to reach the store",
                )
                pids = [r["pid"] for r in c.replicas(kid) if r["state"] == "running"]
                assert len(pids) == 3
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                await async_wait_for(
                    lambda: all(process_gone(p) for p in pids), 10, "the replicas to die"
                )

                def restored() -> bool:
                    running = [r for r in c.replicas(kid) if r["state"] == "running"]
                    return (
                        len(running) == 3
                        and not {r["pid"] for r in running} & set(pids)
                        and c.kernel_summary(kid)["execution_state"] == "idle"
                    )

                await async_wait_for(
                    restored,
                    90,
                    "the kernel to be restored on three new replicas",
                )
                result = await channels.execute(
                    "print(a, b, double(4), hashlib.sha256(big).hexdigest() == digest)", 60
                )
                assert result.status == "ok", (result.reply, c.logs())
                assert result.stream_text() == "42 after 8 True\n"
                notice = result.stream_text("stderr")
                assert (
                    "lost all its replicas" in notice and "restored from its checkpoint" in notice
                )
                assert "2 later cell(s)" in notice
                # Only once.
                again = await channels.execute("print(a)", 60)
                assert again.stream_text("stderr") == "" and again.stream_text() == "42\n"
            assert (c.metric("nbcluster_kernel_restore_seconds_count") or 0) == 1


async def test_checkpoint_of_a_single_replica_kernel_is_refused(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=1, replicas=1) as c:
        async with GatewayClient(c.url, c.token) as gw:
            kernel = await gw.start_kernel()
            with pytest.raises(GatewayError) as caught:
                await gw.checkpoint_kernel(kernel["id"])
            assert caught.value.status == 409
            assert "replicated kernel" in str(caught.value)
            with pytest.raises(GatewayError) as missing:
                await gw.checkpoint_kernel("no-such-kernel")
            assert missing.value.status == 404


async def test_an_idle_kernel_releases_its_replicas_and_its_next_cell_restores_it(
    tmp_path: Path,
) -> None:
    with running_cluster(
        tmp_path / "state",
        hosts=3,
        gpus_per_host=1,
        replicas=3,
        gateway_args=["--reclaim-idle-after", "1.5"],
    ) as c:
        async with GatewayClient(c.url, c.token) as gw:
            kernel = await gw.start_kernel(env={"KERNEL_GPUS": "1"})
            kid = kernel["id"]
            async with gw.channels(kid) as channels:
                first = await channels.execute("x = 5\ndef f():\n    return x * 2", 60)
                assert first.status == "ok", first.reply
                pids = {r["pid"] for r in c.replicas(kid)}

                def reclaimed() -> bool:
                    return all(r["state"] == "stopped" for r in c.replicas(kid)) and all(
                        process_gone(p) for p in pids
                    )

                await async_wait_for(reclaimed, 60, "the idle kernel's replicas to be released")
                hosts = c.http.get("/api/cluster/hosts").json()
                assert [h["gpus_pending"] for h in hosts] == [0, 0, 0]  # claims released
                assert c.kernel_summary(kid)["execution_state"] == "idle"
                assert c.metric("nbcluster_kernels_reclaimed_total") == 1

                result = await channels.execute("print(x, f())", 90)
                assert result.status == "ok", (result.reply, c.logs())
                assert result.stream_text() == "5 10\n"
                assert "released while it was idle" in result.stream_text("stderr")
                running = [r for r in c.replicas(kid) if r["state"] == "running"]
                assert len(running) == 3 and not {r["pid"] for r in running} & pids
