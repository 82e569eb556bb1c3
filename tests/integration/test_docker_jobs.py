"""The ``docker`` job runtime on a real Docker engine: a job runs in a container of the
nbcluster image through a real gateway and host daemon, its log and output file come back, a
failing and a cancelled job end as they should, a GPU job's device request is the one the
docker CLI sends (and the engine's refusal, with no GPU driver here, is the job's error), and
a worker killed with SIGKILL takes its job containers with it.

Needs an engine (``deploy/docker/engine-up.sh``): skipped without one, failed in CI
(``NBCLUSTER_TEST_REQUIRE_DOCKER=1``). Every container a test makes carries the
``nbcluster.job`` label of a job it submitted (or ``tests.engine.TEST_LABEL``), and is removed
at the end whatever happened.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbcluster.client import GatewayClient
from nbcluster.jobs._docker import LABEL_JOB, LABEL_WORKER, gpu_device_requests

from ..cluster import async_wait_for, process_gone, running_cluster, wait_for
from ..engine import TEST_LABEL, remove_test_containers

# One Docker engine and one swarm node for every test that uses them: `make test` runs tests
# on two workers (pytest-xdist), and these go to the same one, one at a time.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("engine")]

#: A job in the image: says where it runs, waits for the test to look at its container (the
#: file ``go``, which the test makes through ``docker exec``), then writes its output.
IN_IMAGE = """
import os, sys, time
print("python", sys.executable, flush=True)
print("uid", os.getuid(), "job", os.environ["NBCLUSTER_JOB_ID"], flush=True)
print("cwd", os.getcwd(), "input", open("numbers.txt").read(), flush=True)
deadline = time.monotonic() + 60
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.05)
total = sum(map(int, open("numbers.txt").read().split()))
open("result.txt", "w").write(f"sum={total}")
print("done", flush=True)
"""

#: Waits to be stopped; says when SIGTERM reached it (through the container's init).
STOPPABLE = [
    "python",
    "-c",
    "import signal, sys, time\n"
    "def bye(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('sleeping', flush=True)\n"
    "time.sleep(120)\n",
]


@pytest.fixture
def job_ids(engine: Any) -> Iterator[set[str]]:
    """The ids of the jobs a test submits. At its end (its cluster stopped) none of their
    containers may be left: a job's container ends with its job, or its worker's reaper
    removes it once the worker is gone (which takes it a moment). Any left is removed."""
    ids: set[str] = set()
    yield ids

    def left() -> list[Any]:
        return [
            c
            for c in engine.containers.list(all=True, filters={"label": LABEL_JOB})
            if c.labels.get(LABEL_JOB) in ids
        ]

    try:
        wait_for(lambda: not left(), 30, "the jobs' containers to be removed")
    finally:
        remaining = left()
        for container in remaining:
            container.remove(force=True)
    assert not remaining, f"job containers left behind: {[c.name for c in remaining]}"


def _job_containers(engine: Any, job_id: str, status: str | None = None) -> list[Any]:
    """The job's containers (in ``status`` only, e.g. ``running``: a container is created,
    then started)."""
    found = engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"})
    return [c for c in found if status is None or c.status == status]


async def _until_done(gw: GatewayClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    done: dict[str, Any] = {}

    async def finished() -> bool:
        done.update(await gw.get_job(job_id))
        return done["status"] in ("succeeded", "failed", "cancelled")

    await async_wait_for(finished, timeout, f"job {job_id} to end")
    return done


async def test_a_job_runs_in_the_image_and_returns_its_log_and_output(
    tmp_path: Path, engine: Any, image: str, job_ids: set[str]
) -> None:
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            key = await gw.upload_job_input("numbers.txt", b"1 2 3 4")
            job = await gw.submit_job(
                {
                    "runtime": "docker",
                    "image": image,
                    "source": IN_IMAGE,
                    "inputs": {"numbers.txt": key},
                    "outputs": ["result.txt"],
                    "resources": {"cpus": 0.5, "memory_mb": 256},
                }
            )
            job_ids.add(job["id"])
            await async_wait_for(
                lambda: len(_job_containers(engine, job["id"], "running")) == 1,
                60,
                "the job's container to run",
            )
            (container,) = _job_containers(engine, job["id"])
            config, host = container.attrs["Config"], container.attrs["HostConfig"]
            assert config["Image"] == image
            assert config["User"] == "1000:1000"  # never root, even for a root worker
            assert config["WorkingDir"] == "/job"
            assert config["Entrypoint"] == ["python"]  # not the image's `nbcluster`
            assert host["NetworkMode"] == "host"
            assert host["Init"] is True
            assert host["Memory"] == 256 * 2**20 and host["NanoCpus"] == 500_000_000
            (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/job"]
            assert Path(mount["Source"]).is_relative_to(c.state_dir)
            assert container.labels[LABEL_WORKER]
            # The job waits for this: made inside the container, as its user.
            assert container.exec_run(["touch", "/job/go"]).exit_code == 0

            done = await _until_done(gw, job["id"])
            assert done["status"] == "succeeded", done
            assert done["exit_code"] == 0
            log = await gw.job_logs(job["id"])
            assert "python /opt/nbcluster/bin/python\n" in log  # the image's interpreter
            assert f"uid 1000 job {job['id']}\n" in log
            assert "cwd /job input 1 2 3 4\n" in log and log.endswith("done\n")
            assert await gw.job_output(job["id"], "result.txt") == b"sum=10"
            # Removed once its output was copied.
            wait_for(lambda: _job_containers(engine, job["id"]) == [], 30, "the container gone")


async def test_a_failing_job_and_a_cancelled_one(
    tmp_path: Path, engine: Any, image: str, job_ids: set[str]
) -> None:
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            failing = await gw.submit_job(
                {
                    "runtime": "docker",
                    "image": image,
                    "command": ["python", "-c", "import sys; print('bye'); sys.exit(3)"],
                }
            )
            sleeper = await gw.submit_job(
                {"runtime": "docker", "image": image, "command": STOPPABLE}
            )
            job_ids.update({failing["id"], sleeper["id"]})

            done = await _until_done(gw, failing["id"])
            assert done["status"] == "failed" and done["exit_code"] == 3, done
            assert "bye" in await gw.job_logs(failing["id"])

            async def sleeping() -> bool:
                return "sleeping" in await gw.job_logs(sleeper["id"])

            await async_wait_for(sleeping, 60, "the sleeper to run")
            assert len(_job_containers(engine, sleeper["id"])) == 1
            await gw.cancel_job(sleeper["id"])
            done = await _until_done(gw, sleeper["id"])
            assert done["status"] == "cancelled", done
            # SIGTERM reached the job (through tini), not only docker stop's SIGKILL.
            assert "got SIGTERM" in await gw.job_logs(sleeper["id"])
            wait_for(lambda: _job_containers(engine, sleeper["id"]) == [], 30, "it removed")
            assert c.hosts["host-1"].poll() is None


def test_the_gpu_request_is_the_docker_clis(engine: Any, image: str) -> None:
    """What the runtime asks for GPUs N=2 (devices 0 and 1) is what ``docker create
    --gpus '"device=0,1"'`` asks: the engine keeps both as the same DeviceRequest (creating
    needs no GPU; starting does)."""
    label = f"gpu-shape-{time.monotonic_ns()}"
    try:
        cli = subprocess.run(
            [
                "docker",
                "create",
                "--label",
                f"{TEST_LABEL}={label}",
                "--gpus",
                '"device=0,1"',
                "--entrypoint",
                "true",
                image,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        by_cli = engine.containers.get(cli.stdout.strip())
        by_runtime = engine.containers.create(
            image,
            entrypoint=["true"],
            labels={TEST_LABEL: label},
            device_requests=gpu_device_requests(["0", "1"]),
        )
        wanted = by_cli.attrs["HostConfig"]["DeviceRequests"]
        assert wanted and wanted[0]["DeviceIDs"] == ["0", "1"]
        assert by_runtime.attrs["HostConfig"]["DeviceRequests"] == wanted
    finally:
        removed = remove_test_containers(label)
    assert len(removed) == 2


async def test_a_gpu_job_without_a_gpu_driver_fails_with_the_engines_reason(
    tmp_path: Path, engine: Any, image: str, job_ids: set[str]
) -> None:
    """The hosts here offer virtual GPUs and the engine has no NVIDIA runtime: the job gets
    its device request, the engine refuses to start it, and the job says why; nothing is
    left."""
    with running_cluster(tmp_path / "state", hosts=1, gpus_per_host=2) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            job = await gw.submit_job(
                {
                    "runtime": "docker",
                    "image": image,
                    "command": ["python", "-c", "print('never')"],
                    "resources": {"gpus": 1},
                }
            )
            job_ids.add(job["id"])
            done = await _until_done(gw, job["id"])
            assert done["status"] == "failed", done
            assert "could not select device driver" in done["error"], done["error"]
            assert _job_containers(engine, job["id"]) == []
            # Its GPU is given back: another GPU job can be placed.
            assert c.metric("nbcluster_cluster_gpus", state="committed") == 0


async def test_a_killed_workers_containers_are_removed(
    tmp_path: Path, engine: Any, image: str, job_ids: set[str]
) -> None:
    with running_cluster(tmp_path / "state", hosts=1, host_lost_timeout=2.0) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            job = await gw.submit_job({"runtime": "docker", "image": image, "command": STOPPABLE})
            job_ids.add(job["id"])

            async def sleeping() -> bool:
                return "sleeping" in await gw.job_logs(job["id"])

            await async_wait_for(sleeping, 60, "the job to run")
            (container,) = _job_containers(engine, job["id"])
            worker_id = container.labels[LABEL_WORKER]
            reapers = [
                p
                for p in psutil.process_iter(["cmdline"])
                if worker_id in (p.info["cmdline"] or [])
            ]
            assert len(reapers) == 1, "one reaper per worker runtime"
            c.kill_host("host-1")  # SIGKILL: nothing of the daemon runs after it
            wait_for(
                lambda: _job_containers(engine, job["id"]) == [],
                30,
                "the reaper to remove the dead worker's container",
            )
            _, alive = psutil.wait_procs(reapers, timeout=30)
            assert not alive, "the reaper exits once it has done its work"
            done = await _until_done(gw, job["id"], timeout=30)
            assert done["status"] == "failed", done  # no retries, and its worker is lost


#: A worker that starts its reaper and dies at once (SIGKILL), while the reaper's Python is
#: still starting: the death signal comes before the reaper waits for it.
DYING_WORKER = """
import asyncio, os, signal, sys
from nbcluster.jobs._docker import DockerRuntime
async def main():
    runtime = DockerRuntime()
    runtime.worker_id = sys.argv[1]
    await runtime._start_reaper()
    print(runtime._reaper.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_a_reaper_whose_worker_dies_at_once_still_reaps(engine: Any, image: str) -> None:
    worker_id = f"test{time.monotonic_ns()}"
    label = f"reaper-{worker_id}"
    try:
        container = engine.containers.run(
            image,
            entrypoint=["sleep", "120"],
            command=[],
            labels={LABEL_WORKER: worker_id, TEST_LABEL: label},
            network_mode="none",
            detach=True,
        )
        worker = subprocess.run(
            [sys.executable, "-c", DYING_WORKER, worker_id],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert worker.returncode == -signal.SIGKILL, worker.stderr
        reaper = int(worker.stdout.strip())
        wait_for(
            lambda: engine.containers.list(all=True, filters={"id": container.id}) == [],
            30,
            "the reaper to remove the worker's container",
        )
        wait_for(lambda: process_gone(reaper), 30, "the reaper to exit")
    finally:
        left = remove_test_containers(label)
    assert left == []


async def test_many_short_jobs_leave_no_container(
    tmp_path: Path, engine: Any, image: str, job_ids: set[str]
) -> None:
    """Jobs that end at once (the log stream and the wait race the container's end)."""
    with running_cluster(tmp_path / "state", hosts=1) as c:
        async with GatewayClient(c.url, c.token, timeout=60) as gw:
            jobs = [
                await gw.submit_job(
                    {
                        "runtime": "docker",
                        "image": image,
                        "command": ["python", "-c", f"print({n} * {n})"],
                        "resources": {"cpus": 0.1, "memory_mb": 128},
                    }
                )
                for n in range(6)
            ]
            job_ids.update(j["id"] for j in jobs)
            done = await asyncio.gather(*(_until_done(gw, j["id"], 120) for j in jobs))
            assert [d["status"] for d in done] == ["succeeded"] * 6, done
            for n, job in enumerate(jobs):
                assert (await gw.job_logs(job["id"])).strip() == str(n * n)
            assert all(_job_containers(engine, j["id"]) == [] for j in jobs)
