"""Hosts speak only for themselves, and job runs are fenced: a stale run (its host was stopped
past the host-lost timeout and the job ran again elsewhere) is stopped when its host comes back,
its output and end are dropped, and the current run's output and files win, every line once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect

from nbcluster.client import GatewayClient
from nbcluster.hostproto import (
    Hello,
    HostResources,
    JobExited,
    JobOutput,
    ReplicaExited,
    encode,
)

from ..cluster import async_wait_for, process_gone, running_cluster

pytestmark = pytest.mark.integration

#: The first run writes "stale" to its output and prints slowly for minutes; a later run
#: writes "current" and prints many lines at once (over several output chunks).
JOB = """
import pathlib, time
marker = pathlib.Path({marker!r})
first = not marker.exists()
marker.write_text(str(__import__("os").getpid()) if first else "again")
pathlib.Path("result.txt").write_text("stale" if first else "current")
if first:
    for i in range(3000):
        print(f"stale line {{i}}", flush=True)
        time.sleep(0.1)
else:
    for i in range({lines}):
        print(f"current line {{i}} " + "x" * 40, flush=True)
"""

CURRENT_LINES = 5000


def _refused(c: object, reason: str) -> float:
    from ..cluster import Cluster

    assert isinstance(c, Cluster)
    return c.metric("nbcluster_host_events_refused_total", reason=reason) or 0.0


async def test_a_stale_run_is_stopped_and_its_output_dropped(tmp_path: Path) -> None:
    marker = tmp_path / "first-run"
    with running_cluster(tmp_path / "state", hosts=2, host_lost_timeout=2.0) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            job = await gw.submit_job(
                {
                    "source": JOB.format(marker=str(marker), lines=CURRENT_LINES),
                    "retries": 2,
                    "outputs": ["result.txt"],
                }
            )
            jid = job["id"]
            await async_wait_for(marker.exists, 30, "the first run to start")

            async def logged(text: str) -> bool:
                return text in await gw.job_logs(jid)

            await async_wait_for(lambda: logged("stale line 3"), 30, "the first run's output")
            first = await gw.get_job(jid)
            old_host = first["worker"]
            stale_pid = int(marker.read_text())
            host = c.hosts[old_host]
            os.kill(host.pid, signal.SIGSTOP)
            try:
                # Lost, requeued and finished elsewhere, while the stale run goes on.
                async def finished() -> bool:
                    return (await gw.get_job(jid))["status"] in ("succeeded", "failed")

                await async_wait_for(finished, 90, "the job to finish on another host")
                done = await gw.get_job(jid)
                assert done["status"] == "succeeded", done
                assert done["attempts"] == 2 and done["worker"] != old_host
                assert psutil.pid_exists(stale_pid) and not process_gone(stale_pid)
            finally:
                os.kill(host.pid, signal.SIGCONT)
            # The old host comes back: its stale run is stopped (it would print for minutes).
            await async_wait_for(lambda: process_gone(stale_pid), 30, "the stale run to stop")
            await async_wait_for(
                lambda: _refused(c, "stale") >= 1, 30, "the stale run to be counted"
            )
            await async_wait_for(
                lambda: old_host in c.connected_hosts(), 30, "the old host to reconnect"
            )
            assert await gw.job_output(jid, "result.txt") == b"current"
            after = await gw.get_job(jid)
            assert after["status"] == "succeeded" and after["attempts"] == 2
            assert after["output_keys"]["result.txt"].startswith(f"jobs/{jid}/attempts/2/")
            text = await gw.job_logs(jid)
            lines = text.splitlines()
            current = [ln for ln in lines if ln.startswith("current line")]
            assert current == [f"current line {i} " + "x" * 40 for i in range(CURRENT_LINES)]
            # The stale run's lines are only those it wrote before its host was lost.
            first_current = lines.index(current[0])
            assert not any(ln.startswith("stale") for ln in lines[first_current:])
            assert all(ln.startswith(("stale line", "current line")) for ln in lines), [
                ln for ln in lines if not ln.startswith(("stale line", "current line"))
            ][:5]


async def test_a_host_cannot_speak_for_another_hosts_replica_or_job(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=2, replicas=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            kernel = await gw.start_kernel()
            kid = kernel["id"]
            [replica] = c.replicas(kid)
            job = await gw.submit_job(
                {"source": "import time\nprint('real', flush=True)\ntime.sleep(8)\nprint('end')"}
            )
            jid = job["id"]

            async def running() -> bool:
                return (await gw.get_job(jid))["status"] == "running"

            await async_wait_for(running, 30, "the job to run")
            attempt = (await gw.get_job(jid))["attempts"]
            ws_url = c.url.replace("http://", "ws://") + "/api/cluster/hosts/connect"
            async with connect(
                ws_url, additional_headers={"Authorization": f"token {c.join_token}"}
            ) as ws:
                hello = Hello(
                    name="intruder",
                    address="127.0.0.1",
                    resources=HostResources(cpus=1, memory_mb=64),
                    # It claims to run the job, too: it is told to stop (it runs nothing).
                    jobs=[jid],
                    job_attempts={jid: attempt},
                )
                await ws.send(encode(hello))
                await asyncio.wait_for(ws.recv(), 10)  # welcome
                for event in (
                    ReplicaExited(
                        kernel_id=kid,
                        replica_id=replica["replica_id"],
                        exit_code=-9,
                        requested=False,
                    ),
                    JobOutput(job_id=jid, attempt=attempt, data="forged\n", offset=0, end=7),
                    JobExited(job_id=jid, attempt=attempt, exit_code=0, outputs={"x": "k"}),
                ):
                    await ws.send(encode(event))
                await async_wait_for(
                    lambda: _refused(c, "foreign") >= 4, 20, "the forged events to be refused"
                )
            # Nothing changed: the replica runs, the job runs on its own host and ends well.
            assert [r["state"] for r in c.replicas(kid)] == ["running"]
            state = await gw.get_job(jid)
            assert state["status"] == "running" and state["worker"] != "intruder"

            async def ended() -> bool:
                return (await gw.get_job(jid))["status"] == "succeeded"

            await async_wait_for(ended, 60, "the real job to end")
            final = await gw.get_job(jid)
            assert final["output_keys"] == {}
            assert await gw.job_logs(jid) == "real\nend\n"
            async with gw.channels(kid) as channels:
                result = await channels.execute("1 + 1", 60)
                assert result.status == "ok", result.reply
