"""The docker host provider on a real engine: the gateway (a local process) starts host daemons
as containers of the nbcluster image, which register; stop_host removes one; a restarted
gateway adopts its containers by their labels (and stops them once idle, not another
gateway's); a host on a Docker network the test creates advertises its own address there and
runs a kernel."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster.client import GatewayClient
from nbcluster.gateway import DockerHostProvider, HostProviderConfig, HostTemplate

from ..cluster import Cluster, async_wait_for, wait_for
from ..engine import TEST_LABEL

# One Docker engine and one swarm node for every test that uses them: `make test` runs tests
# on two workers (pytest-xdist), and these go to the same one, one at a time.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("engine")]

JOIN = "test-join-token"  # what tests/cluster.py's gateway is given


@pytest.fixture
def gateway_id(engine: Any) -> Iterator[str]:
    """The id the test's gateway labels its hosts with; everything labelled with it is removed
    at the end, whatever happened."""
    gid = f"t{secrets.token_hex(5)}"
    try:
        yield gid
    finally:
        for c in engine.containers.list(all=True, filters={"label": f"nbcluster.gateway={gid}"}):
            c.remove(force=True)


def _host_containers(engine: Any, gid: str) -> list[Any]:
    return list(
        engine.containers.list(
            all=True, filters={"label": ["nbcluster.provider=docker", f"nbcluster.gateway={gid}"]}
        )
    )


def _cluster(tmp_path: Path, gid: str, image: str, *extra: str, **options: Any) -> Cluster:
    state = tmp_path / "state"
    (state / "gateway").mkdir(parents=True)
    (state / "gateway" / "gateway-id").write_text(gid + "\n")
    args = ["--hosts-from", "docker", "--host-image", image, "--scaling-gpus-per-host", "2"]
    return Cluster(state, hosts=0, replicas=1, gateway_args=[*args, *extra], **options)


def test_hosts_are_containers_that_register_and_a_restarted_gateway_adopts_them(
    tmp_path: Path, engine: Any, image: str, gateway_id: str
) -> None:
    cluster = _cluster(
        tmp_path, gateway_id, image, "--min-hosts", "2", "--max-hosts", "2",
        "--scaling-interval", "0.5",
    )  # fmt: skip
    # Another gateway's host container on the same engine: never touched by this one.
    foreign = engine.containers.run(
        image,
        entrypoint=["sleep", "300"],
        detach=True,
        network_mode="none",
        labels={
            TEST_LABEL: gateway_id,
            "nbcluster.provider": "docker",
            "nbcluster.gateway": f"{gateway_id}x",
            "nbcluster.host": "auto-1",
        },
    )
    try:
        cluster.start_gateway()
        wait_for(
            lambda: sorted(cluster.connected_hosts()) == ["auto-1", "auto-2"],
            60,
            "auto-1 and auto-2 to register",
        )
        containers = {c.labels["nbcluster.host"]: c for c in _host_containers(engine, gateway_id)}
        assert sorted(containers) == ["auto-1", "auto-2"]
        container = containers["auto-1"]
        assert container.name == f"nbcluster-{gateway_id}-auto-1"
        assert container.labels["nbcluster.role"] == "host"
        config = container.attrs["Config"]
        # The join token by the environment (through the API), never on the command line.
        assert f"NBCLUSTER_JOIN_TOKEN={JOIN}" in config["Env"]
        assert JOIN not in " ".join(config["Cmd"]) and cluster.token not in str(config)
        assert config["Cmd"][:3] == ["host", "--gateway", cluster.url]
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"

        # The gateway goes away without stopping anything; its containers wait for it.
        cluster.kill_gateway()
        assert all(c.status == "running" for c in _host_containers(engine, gateway_id))
        # A restart with a floor of 1: both hosts come back, are its own, idle: one goes.
        index = cluster.gateway_args.index("--min-hosts")
        cluster.gateway_args[index + 1] = "1"
        cluster.start_gateway()
        # Only a host the provider owns is ever stopped: removing one proves the adoption.
        wait_for(lambda: len(_host_containers(engine, gateway_id)) == 1, 60, "an idle host to go")
        assert cluster.metric("nbcluster_scale_events_total", direction="in", outcome="ok") == 1
        # Nothing was started anew: the survivor is one of the first two.
        (left,) = _host_containers(engine, gateway_id)
        assert left.id in {c.id for c in containers.values()}
        wait_for(
            lambda: cluster.connected_hosts() == [left.labels["nbcluster.host"]],
            30,
            "the other host to stay connected",
        )
        foreign.reload()
        assert foreign.status == "running"
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        foreign.remove(force=True)


async def test_stop_host_removes_the_container(engine: Any, image: str, gateway_id: str) -> None:
    template = HostTemplate(
        provider="docker",
        gateway_id=gateway_id,
        # Nothing listens there: the daemon keeps retrying, which is all this test needs.
        gateway_url="http://127.0.0.1:9",
        settings=HostProviderConfig(kind="docker", image=image),
        gpus_per_host=1,
    )
    provider = DockerHostProvider(template, JOIN, client=engine, stop_grace=2)
    assert await provider.start_hosts(2) == ["auto-1", "auto-2"]
    assert sorted(c.labels["nbcluster.host"] for c in _host_containers(engine, gateway_id)) == [
        "auto-1",
        "auto-2",
    ]

    def running() -> bool:
        return all(c.status == "running" for c in _host_containers(engine, gateway_id))

    await async_wait_for(running, 30, "both host containers to run")
    await provider.stop_host("auto-1")
    assert [c.labels["nbcluster.host"] for c in _host_containers(engine, gateway_id)] == ["auto-2"]
    assert provider.started() == ["auto-2"] and not provider.owns("auto-1")
    # A new provider object (a restarted gateway) finds the other one, and only owns that.
    again = DockerHostProvider(template, JOIN, client=engine, stop_grace=2)
    assert await again.discover() == ["auto-2"]
    await again.stop_host("auto-2")
    assert _host_containers(engine, gateway_id) == []


async def test_a_host_on_a_network_advertises_its_own_address(
    tmp_path: Path, engine: Any, image: str, gateway_id: str
) -> None:
    network = engine.networks.create(
        f"nbtest-{gateway_id}", driver="bridge", labels={"nbcluster.gateway": gateway_id}
    )
    try:
        network.reload()
        bridge_ip = network.attrs["IPAM"]["Config"][0]["Gateway"]
        cluster = _cluster(
            tmp_path, gateway_id, image, "--min-hosts", "1", "--max-hosts", "1",
            "--scaling-interval", "0.5", "--host-network", network.name,
            "--public-url", f"http://{bridge_ip}:{{port}}",
            ip="0.0.0.0",
        )  # fmt: skip
        cluster.gateway_args = [
            a.replace("{port}", str(cluster.port)) for a in cluster.gateway_args
        ]
        try:
            cluster.start_gateway()
            wait_for(lambda: cluster.connected_hosts() == ["auto-1"], 60, "auto-1 to register")
            (host,) = cluster.http.get("/api/cluster/hosts").json()
            (container,) = _host_containers(engine, gateway_id)
            container.reload()
            own = container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]
            assert host["address"] == own != "127.0.0.1"
            async with GatewayClient(cluster.url, cluster.token) as gw:
                kernel = await gw.start_kernel()
                async with gw.channels(kernel["id"]) as channels:
                    result = await channels.execute(
                        "import socket, sys; print(sys.prefix, socket.gethostname())", 60
                    )
                    assert result.status == "ok", result.reply
                    assert result.stream_text() == "/opt/nbcluster auto-1\n"
                await gw.shutdown_kernel(kernel["id"])
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.stop()
    finally:
        for c in _host_containers(engine, gateway_id):
            c.remove(force=True)
        network.remove()
