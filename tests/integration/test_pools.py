"""Host pools end to end (issue 15, "Placement by pool"): hosts started with ``--pool``, a
kernelspec that names a pool, jobs that name one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from nbcluster.client import GatewayClient, GatewayError

from ..cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.integration

ARGV = ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"]


def _spec(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"argv": ARGV, "display_name": "pooled", "language": "python", "metadata": metadata}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("pools")
    specs = root / "kernelspecs"
    pools: dict[str, dict[str, Any]] = {
        "in-b": {"nbcluster": {"pool": "b"}},
        "in-a-provisioner": {"kernel_provisioner": {"config": {"host_pool": "a"}}},
        "in-nowhere": {"nbcluster": {"pool": "nowhere"}},
        "bad-pool": {"nbcluster": {"pool": "Not A Pool"}},
        "stanza": {
            "nbcluster": {
                "pool": "b",
                "resources": {"gpus": 0, "memory_mb": 512},
                "allowed_env": ["MY_*"],
                "launch_timeout": 45,
            }
        },
    }
    for name, metadata in pools.items():
        (specs / name).mkdir(parents=True)
        (specs / name / "kernel.json").write_text(json.dumps(_spec(metadata)))
    with running_cluster(
        root / "state", hosts=0, replicas=1, gateway_args=["--kernelspec-dir", str(specs)]
    ) as c:
        c.start_host("host-a", extra=["--pool", "a"])
        c.start_host("host-b", extra=["--pool", "b"])
        wait_for(lambda: len(c.connected_hosts()) == 2, 30, "the pooled hosts to connect")
        yield c


def test_hosts_report_their_pool(cluster: Cluster) -> None:
    hosts = {h["name"]: h for h in cluster.http.get("/api/cluster/hosts").json()}
    assert {name: h["pool"] for name, h in hosts.items()} == {"host-a": "a", "host-b": "b"}


def test_a_kernelspec_with_a_bad_pool_is_skipped(cluster: Cluster) -> None:
    specs = cluster.http.get("/api/kernelspecs").json()["kernelspecs"]
    assert {"in-b", "in-a-provisioner", "in-nowhere"} <= set(specs)
    assert "bad-pool" not in specs
    # (The log's lines are wrapped: compare the words.)
    words = " ".join((cluster.log_dir / "gateway.log").read_text().split())
    assert "pool 'Not A Pool' is not a pool name" in words


async def test_a_pooled_kernelspecs_replicas_run_in_its_pool(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token, timeout=60) as gw:
        # Two kernels each: least-loaded placement alone would spread them over both hosts.
        ids = [(await gw.start_kernel("in-b"))["id"] for _ in range(2)]
        ids_a = [(await gw.start_kernel("in-a-provisioner"))["id"] for _ in range(2)]
        try:
            for kid in ids:
                assert [r["host"] for r in cluster.replicas(kid)] == ["host-b"]
                assert cluster.kernel_summary(kid)["pool"] == "b"
            for kid in ids_a:
                assert [r["host"] for r in cluster.replicas(kid)] == ["host-a"]
        finally:
            for kid in ids + ids_a:
                await gw.shutdown_kernel(kid)


def test_a_kernelspec_whose_pool_has_no_host_is_refused(cluster: Cluster) -> None:
    response = cluster.http.post("/api/kernels", json={"name": "in-nowhere"})
    assert response.status_code == 400  # no host could ever take it: not a 503
    assert "no host is in pool 'nowhere'" in response.text


async def test_jobs_run_in_their_pool(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token, timeout=60) as gw:
        submitted = [
            await gw.submit_job({"source": "print('hi')", "pool": pool, "resources": {"cpus": 0.1}})
            for pool in ("a", "a", "b", "b")
        ]
        done: list[dict[str, Any]] = []
        for job in submitted:
            path = f"/api/jobs/{job['id']}"

            def ended(path: str = path) -> bool:
                return cluster.http.get(path).json()["status"] in ("succeeded", "failed")

            wait_for(ended, 60, f"job {job['id']} to end")
            done.append(cluster.http.get(path).json())
        assert [j["status"] for j in done] == ["succeeded"] * 4, done
        assert [j["worker"] for j in done] == ["host-a", "host-a", "host-b", "host-b"]
        assert [j["spec"]["pool"] for j in done] == ["a", "a", "b", "b"]


async def test_a_job_for_an_unknown_or_bad_pool_is_refused(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token, timeout=60) as gw:
        with pytest.raises(GatewayError) as unknown:
            await gw.submit_job({"source": "print(1)", "pool": "nowhere"})
        assert unknown.value.status == 400
        assert "no host is in pool 'nowhere'" in str(unknown.value)
        assert "'a', 'b'" in str(unknown.value)
        with pytest.raises(GatewayError) as bad:
            await gw.submit_job({"source": "print(1)", "pool": "Bad Pool"})
        assert bad.value.status in (400, 422)
        assert "is not a pool name" in str(bad.value)
        # Too big within the pool: host-a has 2 GPUs.
        with pytest.raises(GatewayError) as big:
            await gw.submit_job({"source": "print(1)", "pool": "a", "resources": {"gpus": 3}})
        assert big.value.status == 400
        assert "the largest host in pool 'a' has 2" in str(big.value)


async def test_the_gateway_kernelspec_stanza_sets_defaults_env_and_timeout(
    cluster: Cluster,
) -> None:
    """``metadata.nbcluster``: ``resources`` are defaults the client's ``KERNEL_*`` win over,
    ``allowed_env`` lets more than ``KERNEL_*`` through (the rest is dropped), and
    ``launch_timeout`` is the kernel's own."""
    async with GatewayClient(cluster.url, cluster.token, timeout=60) as gw:
        env = {"MY_SETTING": "on", "OTHER": "dropped", "KERNEL_MEMORY_MB": "256"}
        kid = (await gw.start_kernel("stanza", env))["id"]
        try:
            record = cluster.state_record(kid)
            assert record["launch_timeout"] == 45.0
            assert record["request"]["gpus"] == 0
            assert record["request"]["memory_mb"] == 256  # the client's wins over 512
            async with gw.channels(kid) as channels:
                code = (
                    "import os; print([os.environ.get(n) for n in "
                    "('MY_SETTING', 'OTHER', 'KERNEL_GPUS', 'KERNEL_MEMORY_MB')])"
                )
                result = await channels.execute(code, 60)
                assert result.status == "ok", result.reply
                assert result.stream_text() == "['on', None, '0', '256']\n"
        finally:
            await gw.shutdown_kernel(kid)
