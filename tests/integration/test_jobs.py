"""Batch jobs end to end: queues, GPU accounting, a worker's death, fast jobs, gateway
restart, logs and outputs, bad input."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from nbcluster.client import GatewayClient, GatewayError

from ..cluster import async_wait_for, running_cluster

pytestmark = pytest.mark.integration

#: A job that records when it ran and which GPUs it saw, then sleeps a little.
RECORD = """
import json, os, time
began = time.time()
time.sleep({sleep})
print(json.dumps({{"began": began, "ended": time.time(),
                  "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}}))
"""


async def _wait_jobs(gw: GatewayClient, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [await gw.get_job(i) for i in ids]
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not done: {[j['status'] for j in jobs]}")
        await asyncio.sleep(0.2)


async def test_fifty_cpu_and_ten_gpu_jobs_never_more_gpu_jobs_than_gpus(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=2, gpus_per_host=2) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            cpu = [
                await gw.submit_job(
                    {"source": f"print({n} * 2)", "resources": {"cpus": 0.1, "memory_mb": 64}}
                )
                for n in range(50)
            ]
            gpu = [
                await gw.submit_job(
                    {
                        "source": RECORD.format(sleep=0.5),
                        "resources": {"gpus": 1, "cpus": 0.1, "memory_mb": 64},
                    }
                )
                for _ in range(10)
            ]
            assert all(j["status"] in ("queued", "running") for j in cpu + gpu)
            assert {j["spec"]["resources"]["gpus"] for j in gpu} == {1}
            done = await _wait_jobs(gw, [j["id"] for j in cpu + gpu], 240)
            assert all(j["status"] == "succeeded" for j in done), [
                (j["status"], j["error"], j["log_tail"]) for j in done if j["status"] != "succeeded"
            ]
            for n, job in enumerate(done[:50]):
                assert (await gw.job_logs(job["id"])).strip() == str(n * 2)
            runs = [json.loads((await gw.job_logs(j["id"])).strip()) for j in done[50:]]
            for run in runs:
                assert run["gpus"] in ("0", "1")
                overlapping = [o for o in runs if o["began"] <= run["began"] < o["ended"]]
                assert len(overlapping) <= 4
            stats = await gw._call("GET", "/api/jobs/stats")
            assert stats["jobs"]["succeeded"] == 60
            assert c.metric("nbcluster_cluster_gpus", state="committed") == 0


async def test_a_dead_workers_job_is_requeued_and_completes(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=2, host_lost_timeout=2.0) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            marker = tmp_path / "attempts"
            source = (
                "import pathlib, time\n"
                f"p = pathlib.Path({str(marker)!r})\n"
                "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
                "if len(p.read_text()) == 1:\n    time.sleep(60)\n"
                "print('finished on attempt', len(p.read_text()))\n"
            )
            job = await gw.submit_job({"source": source, "retries": 2})
            await async_wait_for(lambda: marker.exists(), 30, "the job to start on a worker")
            running = await gw.get_job(job["id"])
            assert running["status"] == "running"
            c.kill_host(running["worker"])
            [done] = await _wait_jobs(gw, [job["id"]], 60)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 2 and done["worker"] != running["worker"]
            assert "finished on attempt 2" in await gw.job_logs(job["id"])
            assert (c.metric("nbcluster_jobs_requeued_total") or 0) >= 1


async def test_fast_job_returns_its_result_and_bad_input_is_named(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            fast = await gw.submit_job(
                {
                    "fast": True,
                    "source": "print(open('data.txt').read().upper())",
                    "inline_inputs": {"data.txt": "hello"},
                }
            )
            assert fast["status"] == "succeeded" and fast["result"] == "HELLO\n"
            for body, words in [
                ({"command": "ls -l"}, "command: must be a list of strings"),
                ({"command": ["true"], "queue": "nope"}, "queue"),
                ({"command": ["true"], "resources": {"gpus": -1}}, "resources.gpus"),
                ({"command": ["true"], "runtime": "docker"}, "image: required by the docker"),
                (
                    {"fast": True, "source": "1", "inline_inputs": {"x": "a" * (2 * 2**20)}},
                    "over the fast-job limit",
                ),
                ({}, "exactly one of command"),
            ]:
                with pytest.raises(GatewayError) as caught:
                    await gw.submit_job(body)
                assert caught.value.status == 400
                assert words in caught.value.message, caught.value.message
            failing = await gw.submit_job({"source": "import sys\nprint('oops')\nsys.exit(3)"})
            [failed] = await _wait_jobs(gw, [failing["id"]], 60)
            assert failed["status"] == "failed" and failed["exit_code"] == 3
            assert "oops" in failed["log_tail"] and "exited with code 3" in failed["error"]
            again = await gw.cancel_job(failing["id"])
            assert "already failed" in again["message"]
            with pytest.raises(GatewayError) as missing:
                await gw.get_job("nope")
            assert missing.value.status == 404


async def test_outputs_logs_follow_cancel_and_gateway_restart(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            key = await gw.upload_job_input("numbers.txt", b"1 2 3")
            job = await gw.submit_job(
                {
                    "source": (
                        "import time\n"
                        "total = sum(map(int, open('numbers.txt').read().split()))\n"
                        "for i in range(3):\n    print('step', i, flush=True)\n"
                        "    time.sleep(0.2)\n"
                        "open('result.txt', 'w').write(str(total))\n"
                    ),
                    "inputs": {"numbers.txt": key},
                    "outputs": ["result.txt"],
                }
            )
            followed = "".join([chunk async for chunk in gw.follow_job_logs(job["id"])])
            assert followed == "step 0\nstep 1\nstep 2\n"
            assert await gw.job_output(job["id"], "result.txt") == b"6"
            sleeper = await gw.submit_job({"command": ["sleep", "60"]})
            await async_wait_for(
                lambda: c.http.get(f"/api/jobs/{sleeper['id']}").json()["status"] == "running",
                30,
                "the sleeper to run",
            )
            # Every CPU of the host: it fits only once the sleeper is gone, so it stays queued
            # (a job that fits no host at all is refused).
            [host] = c.http.get("/api/cluster/hosts").json()
            queued = await gw.submit_job({"command": ["true"], "resources": {"cpus": host["cpus"]}})
            # A restarted gateway keeps every standard job.
            c.kill_gateway()
            c.start_gateway()
            restored = {j["id"]: j["status"] for j in await gw.list_jobs()}
            assert restored[job["id"]] == "succeeded"
            assert restored[queued["id"]] == "queued"
            assert restored[sleeper["id"]] == "running"
            await async_wait_for(lambda: "host-1" in c.connected_hosts(), 30, "the worker back")
            cancelled = await gw.cancel_job(queued["id"])  # first: the sleeper holds it back
            assert cancelled["job"]["status"] == "cancelled"
            cancelled = await gw.cancel_job(sleeper["id"])
            assert "stopping" in cancelled["message"]
            [done] = await _wait_jobs(gw, [sleeper["id"]], 30)
            assert done["status"] == "cancelled"


def test_the_job_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    state = tmp_path / "state"
    with running_cluster(state, hosts=1) as c:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                # The gateway options before any ``--`` that starts a job's own argv.
                [
                    *(sys.executable, "-m", "nbcluster", "job", args[0]),
                    *("--url", c.url, "--token", c.token, *args[1:]),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        script = tmp_path / "hello.py"
        script.write_text("import sys\nprint('hello from', sys.argv[0].rsplit('/', 1)[-1])\n")
        fast = cli("submit", "--fast", "--python", str(script))
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == "hello from job.py\n"
        submitted = cli("submit", "--name", "echo", "--", "echo", "one", "two")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        logs = cli("logs", "--follow", job_id)
        assert logs.returncode == 0 and logs.stdout == "one two\n", logs.stderr
        listed = cli("ls", "--json")
        assert any(
            j["id"] == job_id and j["status"] == "succeeded" for j in json.loads(listed.stdout)
        )
        got = cli("get", job_id)
        assert json.loads(got.stdout)["spec"]["command"] == ["echo", "one", "two"]
        assert "already succeeded" in cli("cancel", job_id).stdout
        bad = cli("submit", "--env", "oops", "--", "true")
        assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


async def test_jobs_in_redis_survive_a_gateway_restart(tmp_path: Path) -> None:
    import secrets

    import redis

    prefix = f"nbcluster-test-{secrets.token_hex(4)}/"
    url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        with running_cluster(tmp_path / "state", hosts=1, gateway_args=["--redis", url]) as c:
            async with GatewayClient(c.url, c.token, timeout=60) as gw:
                done = await gw.submit_job({"command": ["echo", "kept"]})
                [finished] = await _wait_jobs(gw, [done["id"]], 60)
                assert finished["status"] == "succeeded"
                # Every CPU of the host while a sleeper holds one: it stays queued (a job that
                # fits no host at all is refused).
                sleeper = await gw.submit_job({"command": ["sleep", "60"]})
                await async_wait_for(
                    lambda: c.http.get(f"/api/jobs/{sleeper['id']}").json()["status"] == "running",
                    30,
                    "the sleeper to run",
                )
                [host] = c.http.get("/api/cluster/hosts").json()
                waiting = await gw.submit_job(
                    {"command": ["true"], "resources": {"cpus": host["cpus"]}}
                )
                assert client.exists(f"{prefix}job/{done['id']}")
                c.kill_gateway()
                c.start_gateway()
                jobs = {j["id"]: j for j in await gw.list_jobs()}
                assert jobs[done["id"]]["status"] == "succeeded"
                assert jobs[waiting["id"]]["status"] == "queued"
                assert await gw.job_logs(done["id"]) == "kept\n"
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


async def test_server_sent_events_carry_status_and_output(tmp_path: Path) -> None:
    import httpx

    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            job = await gw.submit_job(
                {"source": "import time\ntime.sleep(0.5)\nprint('from the job')"}
            )
            events: list[tuple[str, dict[str, Any]]] = []
            headers = {"Authorization": f"token {c.token}"}
            async with (
                httpx.AsyncClient(base_url=c.url, headers=headers, timeout=60) as http,
                http.stream("GET", f"/api/jobs/{job['id']}/events") as response,
            ):
                assert response.headers["content-type"].startswith("text/event-stream")
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line.removeprefix("data: "))))
            statuses = [e["status"] for k, e in events if k == "status"]
            assert statuses[-1] == "succeeded"
            assert "running" in statuses or statuses[0] == "running"
            output = "".join(e["data"] for k, e in events if k == "log")
            assert output == "from the job\n"
