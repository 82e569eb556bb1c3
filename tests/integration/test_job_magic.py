"""``%%job`` and ``%jobs`` in a real kernel of a real cluster: the cell runs as a batch job on
a worker, its output streams into the cell, its outputs land in the kernel's directory and its
record is ``_job``; interrupting the cell and answering "c" cancels the job."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nbcluster.client import GatewayClient

from ..cluster import async_wait_for, running_cluster

pytestmark = pytest.mark.integration

JOB_CELL = "%%job outputs=out.txt\nprint('hello from a job')\nopen('out.txt','w').write('42')\n"


async def test_a_job_cell_streams_downloads_its_output_and_sets_job(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            # The kernel's current directory, where the job's outputs are downloaded.
            kernel = await gw.start_kernel(env={"KERNEL_WORKING_DIR": str(work)})
            async with gw.channels(kernel["id"]) as channels:
                result = await channels.execute(JOB_CELL, timeout=90)
                out = result.stream_text("stdout")
                assert result.status == "ok", (result.reply, out, result.stream_text("stderr"))
                assert "submitted to the cpu queue" in out
                assert "hello from a job" in out
                [job] = await gw.list_jobs(kernel_id=kernel["id"])
                assert f"[nbcluster] job {job['id']} succeeded" in out
                assert f"output out.txt saved to {work / 'out.txt'}" in out
                assert (work / "out.txt").read_text() == "42"

                after = await channels.execute("print(open('out.txt').read(), _job['status'])")
                assert after.status == "ok", after.reply
                assert after.stream_text("stdout") == "42 succeeded\n"

                listed = await channels.execute("%jobs")
                assert listed.status == "ok", listed.reply
                lines = listed.stream_text("stdout").splitlines()
                assert lines[0].split() == ["id", "name", "status", "queue", "exit"]
                assert lines[1].split() == [job["id"], "succeeded", "cpu", "0"]

                bad = await channels.execute("%%job gpus=many\nprint(1)\n")
                assert bad.status == "error" and bad.reply["ename"] == "UsageError"
                assert "option 'gpus'" in bad.reply["evalue"]
                assert len(await gw.list_jobs(kernel_id=kernel["id"])) == 1
            await gw.shutdown_kernel(kernel["id"])


async def test_interrupting_a_job_cell_and_answering_c_cancels_the_job(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            kernel = await gw.start_kernel(env={"KERNEL_WORKING_DIR": str(tmp_path)})
            async with gw.channels(kernel["id"]) as channels:
                cell = asyncio.create_task(
                    channels.execute(
                        "%%job name=sleeper\nimport time\nprint('started', flush=True)\n"
                        "time.sleep(120)\n",
                        timeout=90,
                        stdin=["c"],
                    )
                )

                async def started() -> bool:
                    jobs = await gw.list_jobs(kernel_id=kernel["id"])
                    return bool(jobs) and "started" in await gw.job_logs(jobs[0]["id"])

                await async_wait_for(started, 60, "the job to start")
                await asyncio.sleep(0.5)  # the cell is streaming its output
                await gw.interrupt_kernel(kernel["id"])
                result = await cell
                out = result.stream_text("stdout")
                assert result.status == "error", (result.reply, out)
                assert result.reply["ename"] == "JobError", result.reply
                assert "started" in out and "cancellation requested" in out
                [job] = await gw.list_jobs(kernel_id=kernel["id"])
                assert job["spec"]["name"] == "sleeper"
                await async_wait_for(
                    lambda: c.http.get(f"/api/jobs/{job['id']}").json()["status"] == "cancelled",
                    30,
                    "the job to be cancelled",
                )
                after = await channels.execute("print(_job['id'])")
                assert after.stream_text("stdout") == f"{job['id']}\n"
            await gw.shutdown_kernel(kernel["id"])
