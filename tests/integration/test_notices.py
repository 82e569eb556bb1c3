"""Cluster notices that real faults and operator actions produce, read from the
server-sent-event stream of real gateways over loopback, one notice kind at least once each:

* a host daemon killed and back, a failing job (``cluster``): host_disconnected, host_lost,
  replica_lost, host_joined, replica_replaced, job_requeued, job_failed;
* operator actions and replica kills on one kernel (``ops_cluster``): host_drained,
  host_undrained (API and ``nbcluster drain``), migration_started/finished (``migrate``),
  executor_changed (the executing replica killed with SIGKILL), kernel_restoring/restored
  (every replica killed);
* GPU contention with auto-scaling (``scaling_cluster``): scale_out, cell_waited, scale_in;
* idle reclamation and a Redis server that goes away (``redis_cluster``): kernel_reclaimed,
  store_unreachable.

docs/dashboard.md says which kinds are not produced here and why. (The dashboard's browser
test watches ``replica_lost``/``replica_replaced`` for a killed replica process;
``tests/unit/test_notices.py`` covers the ring and the API's filters.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nbcluster.client import GatewayClient, GatewayError, KernelChannels

from ..cluster import Cluster, async_wait_for, free_port, process_gone, running_cluster, wait_for

pytestmark = pytest.mark.integration


class StreamReader:
    """Reads ``/api/cluster/events/stream`` in a thread; ``notices`` grows as frames come."""

    def __init__(self, cluster: Cluster, since: int = 0) -> None:
        self.notices: list[dict[str, Any]] = []
        self._client = httpx.Client(
            base_url=cluster.url, headers={"Authorization": f"token {cluster.token}"}, timeout=None
        )
        self._since = since
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream(
                "GET", "/api/cluster/events/stream", params={"since": self._since}
            ) as response:
                response.raise_for_status()
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "notice":
                        self.notices.append(json.loads(line[6:]))
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by the test

    def kinds(self, subject: str = "") -> list[str]:
        return [n["kind"] for n in self.notices if n["subject"].startswith(subject)]

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("notices") / "state", hosts=3, replicas=3) as c:
        yield c


def test_a_lost_host_and_its_return_and_a_failed_job_are_told(cluster: Cluster) -> None:
    reader = StreamReader(cluster)  # replays the hosts' joins first (since=0)
    try:
        wait_for(lambda: reader.kinds("host/").count("host_joined") == 3, 20, "3 joins")
        kernel = cluster.http.post("/api/kernels", json={}).json()["id"]
        wait_for(
            lambda: sum(r["state"] == "running" for r in cluster.replicas(kernel)) == 3,
            60,
            "three replicas",
        )
        cluster.kill_host("host-3")
        wait_for(
            lambda: {"host_disconnected", "host_lost"} <= set(reader.kinds("host/host-3")),
            30,
            "host-3 disconnected and lost",
        )
        wait_for(lambda: "replica_lost" in reader.kinds(f"kernel/{kernel}"), 30, "replica_lost")
        lost = next(n for n in reader.notices if n["kind"] == "replica_lost")
        assert lost["kernel_id"] == kernel and lost["owner"] == "admin"
        assert "host-3" in lost["message"]

        cluster.start_host("host-3")
        wait_for(lambda: reader.kinds("host/host-3").count("host_joined") == 2, 30, "a rejoin")
        wait_for(
            lambda: "replica_replaced" in reader.kinds(f"kernel/{kernel}"), 60, "replica_replaced"
        )

        job = cluster.http.post(
            "/api/jobs", json={"command": ["python", "-c", "raise SystemExit(3)"], "retries": 1}
        )
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        wait_for(
            lambda: reader.kinds(f"job/{job_id}") == ["job_requeued", "job_failed"],
            60,
            "the job requeued, then failed",
        )
        failed = next(n for n in reader.notices if n["kind"] == "job_failed")
        assert "exit code 3" in failed["message"] and failed["severity"] == "error"
        # The log says the same, once (the line comes from the notice).
        # (Whitespace normalised: rich wraps long log lines.)
        gateway_log = " ".join((cluster.log_dir / "gateway.log").read_text().split())
        assert gateway_log.count(" ".join(failed["message"].split())) == 1
        # Paging from a cursor gives the same notices as the stream did.
        page = cluster.http.get("/api/cluster/events", params={"limit": 1000}).json()
        assert [n["seq"] for n in page["notices"]] == [n["seq"] for n in reader.notices]
    finally:
        reader.close()


def nbcluster(cluster: Cluster, *args: str) -> str:
    """Run the ``nbcluster`` CLI against ``cluster``; its stdout (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "nbcluster", *args, "--url", cluster.url, "--token", cluster.token],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},  # rich's tables, not wrapped
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def host_row(cluster: Cluster, name: str) -> dict[str, Any]:
    row: dict[str, Any] = next(
        h for h in cluster.http.get("/api/cluster/hosts").json() if h["name"] == name
    )
    return row


@pytest.fixture(scope="module")
def ops_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("ops") / "state"
    with running_cluster(state, hosts=4, gpus_per_host=1, replicas=3) as c:
        yield c


async def test_drain_migration_executor_change_and_restore_are_told(ops_cluster: Cluster) -> None:
    c = ops_cluster
    reader = StreamReader(c)
    try:
        async with GatewayClient(c.url, c.token) as gw:
            kid = (await gw.start_kernel())["id"]
            async with gw.channels(kid) as channels:
                assert (await channels.execute("x = 1", 60)).status == "ok"
                replicas = c.replicas(kid)
                [free] = {"host-1", "host-2", "host-3", "host-4"} - {r["host"] for r in replicas}

                # Drain (the CLI): told, shown, and no replica may move there.
                out = nbcluster(c, "drain", free)
                assert f"host {free} drained" in out
                assert host_row(c, free)["draining"] is True
                assert "draining" in nbcluster(c, "status")
                wait_for(lambda: "host_drained" in reader.kinds(f"host/{free}"), 10, "drained")
                moving = replicas[0]["replica_id"]
                with pytest.raises(GatewayError) as caught:
                    await gw.migrate_replica(kid, moving, free)
                assert caught.value.status == 409 and free in str(caught.value)
                with pytest.raises(GatewayError) as unknown:
                    await gw.drain_host("no-such-host")
                assert unknown.value.status == 404 and "no-such-host" in str(unknown.value)
                assert "undrained" in nbcluster(c, "drain", free, "--undo")
                assert host_row(c, free)["draining"] is False
                wait_for(lambda: "host_undrained" in reader.kinds(f"host/{free}"), 10, "undone")

                # An operator's migration: started, then finished.
                await gw.migrate_replica(kid, moving, free)
                wait_for(
                    lambda: (
                        {"migration_started", "migration_finished"}
                        <= set(reader.kinds(f"kernel/{kid}"))
                    ),
                    30,
                    "the migration's notices",
                )

                # The executing replica killed: the next cell runs on another one.
                assert (await channels.execute("x += 1", 60)).status == "ok"
                executor = c.kernel_summary(kid)["executor"]
                [pid] = [r["pid"] for r in c.replicas(kid) if r["replica_id"] == executor]
                os.kill(pid, signal.SIGKILL)
                result = await channels.execute("x += 1; print(x)", 90)
                assert result.status == "ok" and result.stream_text() == "3\n", result.reply
                wait_for(
                    lambda: "executor_changed" in reader.kinds(f"kernel/{kid}"),
                    30,
                    "executor_changed",
                )
                changed = next(n for n in reader.notices if n["kind"] == "executor_changed")
                assert str(executor) in changed["message"] and changed["owner"] == "admin"

                # Every replica killed: the kernel is rebuilt from its checkpoint.
                await async_wait_for(
                    lambda: sum(r["state"] == "running" for r in c.replicas(kid)) == 3,
                    60,
                    "three running replicas again",
                )
                await gw.checkpoint_kernel(kid)
                pids = [r["pid"] for r in c.replicas(kid) if r["state"] == "running"]
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                await async_wait_for(
                    lambda: (
                        {"kernel_restoring", "kernel_restored"}
                        <= set(reader.kinds(f"kernel/{kid}"))
                    ),
                    90,
                    "the kernel restored",
                )
                again = await channels.execute("print(x)", 90)
                assert again.status == "ok" and again.stream_text() == "3\n", again.reply
        kinds = reader.kinds(f"kernel/{kid}")
        assert kinds.index("kernel_restoring") < kinds.index("kernel_restored")
    finally:
        reader.close()


async def test_a_kernel_that_cannot_be_restored_is_told_dead(ops_cluster: Cluster) -> None:
    c = ops_cluster
    reader = StreamReader(c)
    try:
        async with GatewayClient(c.url, c.token) as gw:
            kid = (await gw.start_kernel())["id"]
            await async_wait_for(
                lambda: sum(r["state"] == "running" for r in c.replicas(kid)) == 3,
                60,
                "three running replicas",
            )
            # Nothing of it in the store: its replicas all killed, it cannot be rebuilt.
            shutil.rmtree(c.state_dir / "store" / "kernels" / kid, ignore_errors=True)
            pids = [r["pid"] for r in c.replicas(kid)]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            await async_wait_for(
                lambda: "kernel_dead" in reader.kinds(f"kernel/{kid}"), 90, "kernel_dead"
            )
            dead = next(n for n in reader.notices if n["kind"] == "kernel_dead")
            assert dead["severity"] == "error" and "could not be restored" in dead["message"]
            await gw.shutdown_kernel(kid)
    finally:
        reader.close()


#: Holds its GPU until ``release`` exists (bounded).
HOLD = """
import time
from pathlib import Path
began = time.time()
while not Path({release!r}).exists() and time.time() - began < 90:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def scaling_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    scaling = ["--min-hosts", "3", "--max-hosts", "4", "--scaling-interval", "0.5"]
    with running_cluster(
        tmp_path_factory.mktemp("scaling") / "state",
        hosts=3,
        gpus_per_host=1,
        replicas=3,
        gateway_args=[*scaling, "--scaling-gpus-per-host", "1"],
    ) as c:
        yield c


async def test_gpu_contention_scales_out_a_cell_waits_then_scales_in(
    scaling_cluster: Cluster, tmp_path: Path
) -> None:
    c = scaling_cluster
    reader = StreamReader(c)
    release = tmp_path / "release"
    opened: list[KernelChannels] = []
    try:
        async with GatewayClient(c.url, c.token) as gw:
            kernels = [(await gw.start_kernel(env={"KERNEL_GPUS": "1"}))["id"] for _ in range(4)]
            for kid in kernels:
                opened.append(gw.channels(kid))
                await opened[-1].__aenter__()
            hogs = [
                asyncio.create_task(ch.execute(HOLD.format(release=str(release)), 120))
                for ch in opened[:3]
            ]
            await async_wait_for(
                lambda: c.metric("nbcluster_cluster_gpus", state="committed") == 3,
                60,
                "three cells to hold every GPU",
            )
            # The fourth kernel's cell waits: a host is added and the cell gets its GPU there.
            waiting = await opened[3].execute("print('ran')", 120)
            assert waiting.status == "ok" and waiting.stream_text() == "ran\n", waiting.reply
            wait_for(lambda: "scale_out" in reader.kinds("cluster"), 10, "scale_out")
            wait_for(
                lambda: "cell_waited" in reader.kinds(f"kernel/{kernels[3]}"), 10, "cell_waited"
            )
            waited = next(n for n in reader.notices if n["kind"] == "cell_waited")
            assert waited["seconds"] > 0 and waited["kernel_id"] == kernels[3]
            release.touch()
            for task in hogs:
                assert (await task).status == "ok"
            for kid in kernels:
                await gw.shutdown_kernel(kid)
            # Idle: the added host goes.
            wait_for(lambda: "scale_in" in reader.kinds("cluster"), 90, "scale_in")
    finally:
        release.touch()
        for ch in opened:
            await ch.__aexit__(None, None, None)
        reader.close()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Any]]:
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, 20, "redis-server to start")
        gateway_args = ["--redis", f"redis://127.0.0.1:{port}/0", "--reclaim-idle-after", "1.5"]
        with running_cluster(
            tmp_path_factory.mktemp("redis") / "state",
            hosts=3,
            replicas=3,
            gateway_args=gateway_args,
        ) as c:
            yield c, server
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(10)


async def test_an_idle_kernel_reclaimed_and_redis_gone_are_told(
    redis_cluster: tuple[Cluster, Any],
) -> None:
    c, server = redis_cluster
    reader = StreamReader(c)
    try:
        async with GatewayClient(c.url, c.token) as gw:
            kid = (await gw.start_kernel())["id"]
            async with gw.channels(kid) as channels:
                assert (await channels.execute("y = 7", 60)).status == "ok"
                pids = {r["pid"] for r in c.replicas(kid)}
                await async_wait_for(
                    lambda: "kernel_reclaimed" in reader.kinds(f"kernel/{kid}"),
                    60,
                    "kernel_reclaimed",
                )
                await async_wait_for(
                    lambda: all(process_gone(p) for p in pids), 30, "the replicas released"
                )
        # Redis goes away: the next notice cannot be written to the stream.
        server.terminate()
        server.wait(10)
        c.kill_host("host-3")
        wait_for(lambda: "store_unreachable" in reader.kinds("cluster"), 30, "store_unreachable")
        notice = next(n for n in reader.notices if n["kind"] == "store_unreachable")
        assert "Redis" in notice["message"] and notice["severity"] == "error"
    finally:
        reader.close()
