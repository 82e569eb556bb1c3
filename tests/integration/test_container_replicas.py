"""Kernel replicas as containers of the image their kernelspec names, on a real Docker engine:
the replicas are containers of it (inspected), a cell runs the image's Python, a killed
replica container is a lost replica that is replaced with every variable kept, a kernelspec
without an image still runs processes, and a host daemon killed with SIGKILL takes its
replica containers with it (the lifeline)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster.client import GatewayClient

from ..cluster import Cluster, running_cluster, wait_for

# One Docker engine and one swarm node for every test that uses them: `make test` runs tests
# on two workers (pytest-xdist), and these go to the same one, one at a time.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("engine")]

LABEL_KERNEL = "nbcluster.kernel"


@pytest.fixture
def cluster(tmp_path: Path, image: str, engine: Any) -> Iterator[Cluster]:
    specs = _image_kernelspec(tmp_path, image)
    # A network store: the containers run as an unprivileged user, who cannot write a local
    # store directory owned by the test's user (docs/containers.md).
    store = f"redis://127.0.0.1:6379/0?prefix=test-containers-{secrets.token_hex(4)}/"
    hosts = [f"c{secrets.token_hex(3)}-{i}" for i in range(1, 5)]
    try:
        with running_cluster(
            tmp_path / "state",
            hosts=0,
            replicas=3,
            gateway_args=["--kernelspec-dir", str(specs), "--store", store],
            host_args=["--container-runtime", "docker"],
        ) as c:
            for name in hosts:
                c.start_host(name)
            wait_for(lambda: len(c.connected_hosts()) == 4, 30, "hosts to connect")
            yield c
    finally:
        for container in engine.containers.list(
            all=True, filters={"label": "nbcluster.role=replica"}
        ):
            if container.labels.get("nbcluster.host") in hosts:
                container.remove(force=True)


def _image_kernelspec(tmp_path: Path, image: str) -> Path:
    """A kernelspec directory with ``in-image``, whose replicas run in ``image``."""
    specs = tmp_path / "kernelspecs"
    (specs / "in-image").mkdir(parents=True)
    (specs / "in-image" / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
                "display_name": "Python 3 (nbcluster image)",
                "language": "python",
                "metadata": {"kernel_provisioner": {"config": {"image_name": image}}},
            }
        )
    )
    return specs


def _containers(engine: Any, kernel_id: str) -> dict[str, Any]:
    """The kernel's running replica containers, by replica id."""
    found = engine.containers.list(filters={"label": f"{LABEL_KERNEL}={kernel_id}"})
    return {c.labels["nbcluster.replica"]: c for c in found}


def _running(cluster: Cluster, kernel_id: str) -> set[str]:
    return {r["replica_id"] for r in cluster.replicas(kernel_id) if r["state"] == "running"}


async def test_replicas_run_in_the_kernelspecs_image_and_survive_a_killed_container(
    cluster: Cluster, engine: Any, image: str
) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kernel = await gw.start_kernel("in-image")
        kid = kernel["id"]
        containers = _containers(engine, kid)
        assert set(containers) == _running(cluster, kid)
        assert len(containers) == 3
        for container in containers.values():
            assert container.image.tags and image in container.image.tags
            assert container.attrs["HostConfig"]["NetworkMode"] == "host"
            assert container.attrs["Config"]["User"] != ""  # never root in the container
            env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
            assert "NBCLUSTER_JOIN_TOKEN" not in env and "NBCLUSTER_TOKEN" not in env

        plain = await gw.start_kernel("python3")
        assert _containers(engine, plain["id"]) == {}  # no image: processes, as before

        async with gw.channels(kid) as channels:
            result = await channels.execute("import sys\nx = 41\nprint(sys.prefix)")
            assert result.status == "ok", result.reply
            assert result.stream_text() == "/opt/nbcluster\n"  # the image's environment

            executor = str(cluster.kernel_summary(kid)["executor"])
            containers[executor].kill(signal="SIGKILL")

            def replaced() -> bool:
                running = _running(cluster, kid)
                return len(running) == 3 and executor not in running

            wait_for(replaced, 60, "a replacement replica container to join")
            assert set(_containers(engine, kid)) == _running(cluster, kid)
            result = await channels.execute("print(x + 1)")
            assert result.status == "ok", result.reply
            assert result.stream_text() == "42\n"

        await gw.shutdown_kernel(kid)
        wait_for(lambda: _containers(engine, kid) == {}, 30, "the containers to be removed")
        await gw.shutdown_kernel(plain["id"])


async def test_a_host_daemon_killed_takes_its_replica_containers_with_it(
    cluster: Cluster, engine: Any
) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kernel = await gw.start_kernel("in-image")
        kid = kernel["id"]
        victim = next(r for r in cluster.replicas(kid) if r["state"] == "running")
        cluster.kill_host(victim["host"])  # SIGKILL: no chance to stop its replicas
        wait_for(
            lambda: victim["replica_id"] not in _containers(engine, kid),
            30,
            "the dead daemon's replica container to exit",
        )
        await gw.shutdown_kernel(kid)


async def test_a_host_without_a_container_runtime_says_so(tmp_path: Path, image: str) -> None:
    specs = _image_kernelspec(tmp_path, image)
    with running_cluster(
        tmp_path / "state", hosts=1, gateway_args=["--kernelspec-dir", str(specs)]
    ) as c:
        response = c.http.post("/api/kernels", json={"name": "in-image"})
        assert response.status_code >= 400
        assert "this host runs no containers" in response.text
        assert "--container-runtime docker" in response.text
