"""GPUs on demand with real processes: oversubscription, binding per cell, waiting, interrupt,
reservation refusal, migration to a host with free GPUs, manual migration, auto-scaling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster.client import GatewayClient, GatewayError, KernelChannels

from ..cluster import Cluster, async_wait_for, running_cluster, wait_for

pytestmark = pytest.mark.integration

ONE_GPU = {"KERNEL_GPUS": "1"}

#: Records when the cell ran and what it was given, waits for ``release`` (bounded).
TIMED_CELL = """
import json, os, time
from pathlib import Path
import nbcluster.runtime
began = time.time()
release = Path({release!r})
while not release.exists() and time.time() - began < 60:
    time.sleep(0.05)
print(json.dumps({{"began": began, "ended": time.time(), "gpus": list(nbcluster.runtime.gpus()),
                  "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}))
"""


@pytest.fixture
def gpu_cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path / "state", hosts=3, gpus_per_host=1, replicas=3) as c:
        yield c


def _waiting_text(result: Any) -> str:
    return str(result.stream_text("stderr"))


@contextlib.asynccontextmanager
async def _every_gpu_held(
    gw: GatewayClient, cluster: Cluster, release: Path
) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Three 1-GPU kernels whose cells hold the cluster's three GPUs until ``release``
    exists; yields those cells (to await once released)."""
    hogs = [await gw.start_kernel(env=ONE_GPU) for _ in range(3)]
    async with (
        gw.channels(hogs[0]["id"]) as h0,
        gw.channels(hogs[1]["id"]) as h1,
        gw.channels(hogs[2]["id"]) as h2,
    ):
        busy = [
            asyncio.create_task(h.execute(TIMED_CELL.format(release=str(release)), 90))
            for h in (h0, h1, h2)
        ]
        await async_wait_for(
            lambda: cluster.metric("nbcluster_cluster_gpus", state="committed") == 3,
            30,
            "the hogs to hold every GPU",
        )
        yield busy


async def test_six_kernels_share_three_gpus_at_most_three_cells_at_once(
    gpu_cluster: Cluster, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    async with GatewayClient(gpu_cluster.url, gpu_cluster.token) as gw:
        kernels = [await gw.start_kernel(env=ONE_GPU) for _ in range(6)]
        assert len({k["id"] for k in kernels}) == 6  # all six started: oversubscription
        hosts = gpu_cluster.http.get("/api/cluster/hosts").json()
        assert [h["gpus_pending"] for h in hosts] == [6, 6, 6]
        assert all(h["gpus_committed"] == 0 for h in hosts)
        channels = [gw.channels(k["id"]) for k in kernels]
        for c in channels:
            await c.__aenter__()
        try:
            cells = [
                asyncio.create_task(c.execute(TIMED_CELL.format(release=str(release)), 90))
                for c in channels
            ]
            # Three run; three wait, and the cluster says so.
            await async_wait_for(
                lambda: gpu_cluster.metric("nbcluster_cells_waiting_for_gpus") == 3,
                30,
                "three cells to wait for GPUs",
            )
            assert gpu_cluster.metric("nbcluster_cluster_gpus", state="committed") == 3
            release.touch()
            results = await asyncio.gather(*cells)
        finally:
            for c in channels:
                await c.__aexit__(None, None, None)
        runs = []
        for result in results:
            assert result.status == "ok", result.reply
            run = json.loads(result.stream_text().strip().splitlines()[-1])
            assert len(run["gpus"]) == 1
            assert run["cuda"] == str(run["gpus"][0])
            runs.append(run)
        waited = [r for r in results if "Waiting for 1 GPU" in _waiting_text(r)]
        assert len(waited) == 3, [_waiting_text(r) for r in results]
        for r in waited:
            assert "no host has 1 idle GPUs" in _waiting_text(r)
            assert "Got 1 GPU" in _waiting_text(r)
        # Never more than three cells at once: count overlaps at every start.
        for run in runs:
            overlapping = [o for o in runs if o["began"] <= run["began"] < o["ended"]]
            assert len(overlapping) <= 3
        assert gpu_cluster.metric("nbcluster_cluster_gpus", state="committed") == 0
        assert (gpu_cluster.metric("nbcluster_gpu_wait_seconds_count") or 0) >= 3
        for k in kernels:
            await gw.shutdown_kernel(k["id"])
        hosts = gpu_cluster.http.get("/api/cluster/hosts").json()
        assert [h["gpus_pending"] for h in hosts] == [0, 0, 0]


async def test_interrupting_a_waiting_cell_cancels_the_wait(
    gpu_cluster: Cluster, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    async with GatewayClient(gpu_cluster.url, gpu_cluster.token) as gw:
        waiter = await gw.start_kernel(env=ONE_GPU)
        async with (
            gw.channels(waiter["id"]) as w,
            _every_gpu_held(gw, gpu_cluster, release) as busy,
        ):
            cell = asyncio.create_task(w.execute("x = 1\nprint('ran')", 60))
            await async_wait_for(
                lambda: gpu_cluster.metric("nbcluster_cells_waiting_for_gpus") == 1,
                30,
                "the cell to wait",
            )
            started = time.monotonic()
            await gw.interrupt_kernel(waiter["id"])
            result = await asyncio.wait_for(cell, 10)
            assert time.monotonic() - started < 10
            assert result.status == "error"
            assert result.reply["ename"] == "KeyboardInterrupt"
            assert "Waiting for 1 GPU" in _waiting_text(result)
            assert result.stream_text() == ""  # it never ran
            assert gpu_cluster.metric("nbcluster_cells_waiting_for_gpus") == 0
            release.touch()
            for task in busy:
                assert (await task).status == "ok"
            # The kernel is fine: the next cell runs, and x was never set.
            again = await w.execute("print('x' in globals())", 60)
            assert again.status == "ok" and again.stream_text() == "False\n"


async def test_a_cpu_cell_runs_at_once_while_every_gpu_is_busy(
    gpu_cluster: Cluster, tmp_path: Path
) -> None:
    """``%%cpu``: a GPU kernel's cell that needs no GPU does not wait for one, sees none, and
    is an ordinary cell otherwise (history, outputs, state)."""
    release = tmp_path / "release"
    async with GatewayClient(gpu_cluster.url, gpu_cluster.token) as gw:
        kernel = await gw.start_kernel(env=ONE_GPU)
        async with (
            gw.channels(kernel["id"]) as k,
            _every_gpu_held(gw, gpu_cluster, release) as busy,
        ):
            cpu = await asyncio.wait_for(
                k.execute(
                    "%%cpu\nimport os\nrows = [1, 2, 3]\n"
                    "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\nsum(rows)\n",
                    30,
                ),
                30,
            )
            assert cpu.status == "ok", cpu.reply
            assert cpu.stream_text() == "''\n"  # ran while every GPU was busy, and saw none
            assert "Waiting for" not in _waiting_text(cpu)
            assert [
                o["content"]["data"]["text/plain"]
                for o in cpu.outputs
                if o["msg_type"] == "execute_result"
            ] == ["6"]
            # the next ordinary cell waits for its GPU, and sees what the %%cpu cell bound
            gpu_cell = asyncio.create_task(k.execute("print(rows)", 60))
            await async_wait_for(
                lambda: gpu_cluster.metric("nbcluster_cells_waiting_for_gpus") == 1,
                30,
                "the ordinary cell to wait for a GPU",
            )
            release.touch()
            for task in busy:
                assert (await task).status == "ok"
            result = await gpu_cell
            assert result.status == "ok" and result.stream_text() == "[1, 2, 3]\n"


async def test_bad_requests_are_refused_with_the_field_named(gpu_cluster: Cluster) -> None:
    async with GatewayClient(gpu_cluster.url, gpu_cluster.token) as gw:
        for env, status, words in [
            ({"KERNEL_GPUS": "-1"}, 400, "KERNEL_GPUS"),
            ({"KERNEL_GPUS": "two"}, 400, "KERNEL_GPUS"),
            ({"KERNEL_MEMORY_MB": "nan"}, 400, "KERNEL_MEMORY_MB"),
            ({"KERNEL_GPUS": "2"}, 400, "requests 2 GPUs; the largest host has 1"),
        ]:
            with pytest.raises(GatewayError) as caught:
                await gw.start_kernel(env=env)
            assert caught.value.status == status
            assert words in str(caught.value)
        assert await gw.list_kernels() == []


def test_reservation_refuses_the_fourth_kernel(tmp_path: Path) -> None:
    with running_cluster(
        tmp_path / "state",
        hosts=3,
        gpus_per_host=1,
        replicas=3,
        gateway_args=["--policy", "reservation"],
    ) as c:
        ids = []
        for _ in range(3):
            response = c.http.post("/api/kernels", json={"env": ONE_GPU})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        # Each holds one GPU for its life, on one replica.
        assert c.metric("nbcluster_cluster_gpus", state="committed") == 3
        assert all(len(c.replicas(i)) == 1 for i in ids)
        response = c.http.post("/api/kernels", json={"env": ONE_GPU})
        assert response.status_code == 503
        assert "no host has 1 free GPUs" in response.json()["message"]
        # A kernel without GPUs still starts.
        assert c.http.post("/api/kernels", json={}).status_code == 201
        c.http.delete(f"/api/kernels/{ids[0]}")
        response = c.http.post("/api/kernels", json={"env": ONE_GPU})
        assert response.status_code == 201, response.text


async def _hold_every_gpu(
    cluster: Cluster, gw: GatewayClient, release: Path, count: int
) -> tuple[list[KernelChannels], list[asyncio.Task[Any]]]:
    hogs = [await gw.start_kernel(env=ONE_GPU) for _ in range(count)]
    channels = [gw.channels(h["id"]) for h in hogs]
    for c in channels:
        await c.__aenter__()
    tasks = [
        asyncio.create_task(c.execute(TIMED_CELL.format(release=str(release)), 120))
        for c in channels
    ]
    await async_wait_for(
        lambda: cluster.metric("nbcluster_cluster_gpus", state="committed") == count,
        30,
        "every GPU to be held",
    )
    return channels, tasks


async def test_a_cell_migrates_to_a_new_host_with_free_gpus_and_keeps_its_variables(
    gpu_cluster: Cluster, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    async with GatewayClient(gpu_cluster.url, gpu_cluster.token) as gw:
        kernel = await gw.start_kernel(env=ONE_GPU)
        async with gw.channels(kernel["id"]) as channels:
            assert (await channels.execute("x = 42; data = list(range(1000))", 60)).status == "ok"
            hog_channels, hogs = await _hold_every_gpu(gpu_cluster, gw, release, 3)
            try:
                cell = asyncio.create_task(
                    channels.execute(
                        "import nbcluster.runtime, socket\nprint(x, sum(data), "
                        "nbcluster.runtime.gpus())",
                        120,
                    )
                )
                await async_wait_for(
                    lambda: gpu_cluster.metric("nbcluster_cells_waiting_for_gpus") == 1,
                    30,
                    "the cell to wait",
                )
                # A fourth host joins: one of the kernel's replicas moves there and runs it.
                gpu_cluster.start_host("host-4")
                result = await asyncio.wait_for(cell, 90)
                assert result.status == "ok", (result.reply, gpu_cluster.logs())
                assert result.stream_text() == "42 499500 (0,)\n"
                assert "Waiting for 1 GPU" in _waiting_text(result)
                replicas = gpu_cluster.replicas(kernel["id"])
                live = [r for r in replicas if r["state"] == "running"]
                assert len(live) == 3
                assert "host-4" in {r["host"] for r in live}
                assert any("migrated to host-4" in r["reason"] for r in replicas)
                assert gpu_cluster.metric("nbcluster_migrations_total", outcome="ok") == 1
            finally:
                release.touch()
                for task in hogs:
                    await task
                for c in hog_channels:
                    await c.__aexit__(None, None, None)
            # The moved replica keeps up with later cells too.
            later = await channels.execute("x += 1; print(x)", 60)
            assert later.stream_text() == "43\n"


async def test_manual_migration_api_and_cli(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "state", hosts=4, gpus_per_host=1, replicas=3) as c:
        async with GatewayClient(c.url, c.token) as gw:
            kernel = await gw.start_kernel()
            async with gw.channels(kernel["id"]) as channels:
                assert (await channels.execute("y = 'kept'", 60)).status == "ok"
                replicas = c.replicas(kernel["id"])
                used = {r["host"] for r in replicas}
                [free] = {"host-1", "host-2", "host-3", "host-4"} - used
                moving = replicas[0]["replica_id"]
                # Refusals: a host that already runs a replica, an unknown replica.
                other = replicas[1]["host"]
                with pytest.raises(GatewayError) as caught:
                    await gw.migrate_replica(kernel["id"], moving, other)
                assert caught.value.status == 409
                assert "already runs a replica" in str(caught.value)
                with pytest.raises(GatewayError) as caught:
                    await gw.migrate_replica(kernel["id"], "nope", None)
                assert caught.value.status == 409 and "has no replica nope" in str(caught.value)
                moved = await gw.migrate_replica(kernel["id"], moving, free)
                assert (moved["from_host"], moved["to_host"]) == (replicas[0]["host"], free)
                live = [r for r in c.replicas(kernel["id"]) if r["state"] == "running"]
                assert {r["host"] for r in live} == (used - {replicas[0]["host"]}) | {free}
                # Every replica serves the state: move the executor too, then read y.
                assert (await channels.execute("pass", 60)).status == "ok"
                executor = c.kernel_summary(kernel["id"])["executor"]
                assert executor is not None
                proc = await asyncio.create_subprocess_exec(
                    *_nbcluster(),
                    "migrate",
                    kernel["id"],
                    str(executor),
                    "--url",
                    c.url,
                    "--token",
                    c.token,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(proc.communicate(), 90)
                assert proc.returncode == 0, err.decode()
                assert f"replica {executor} moved from" in out.decode()
                result = await channels.execute("print(y)", 60)
                assert result.status == "ok" and result.stream_text() == "kept\n"


def _nbcluster() -> list[str]:
    import sys

    return [sys.executable, "-m", "nbcluster"]


async def test_autoscaling_adds_a_host_under_load_and_removes_it_when_idle(
    tmp_path: Path,
) -> None:
    with running_cluster(
        tmp_path / "state",
        hosts=3,
        gpus_per_host=1,
        replicas=3,
        gateway_args=[
            "--min-hosts",
            "3",
            "--max-hosts",
            "4",
            "--scaling-interval",
            "0.5",
            "--scaling-gpus-per-host",
            "1",
        ],
    ) as c:
        release = tmp_path / "release"
        async with GatewayClient(c.url, c.token) as gw:
            hog_channels, hogs = await _hold_every_gpu(c, gw, release, 3)
            try:
                # 3 committed GPUs * 1.10 > 3: one more host.
                wait_for(lambda: "auto-1" in c.connected_hosts(), 60, "a host to be added")
                assert c.metric("nbcluster_scale_events_total", direction="out", outcome="ok") == 1
            finally:
                release.touch()
                for task in hogs:
                    assert (await task).status == "ok"
                for ch in hog_channels:
                    await ch.__aexit__(None, None, None)
            # Idle again: the added host goes, the three static ones stay.
            wait_for(
                lambda: (
                    "auto-1" not in {h["name"] for h in c.http.get("/api/cluster/hosts").json()}
                ),
                60,
                "the added host to be removed",
            )
            assert sorted(c.connected_hosts()) == ["host-1", "host-2", "host-3"]
            assert c.metric("nbcluster_scale_events_total", direction="in", outcome="ok") == 1
