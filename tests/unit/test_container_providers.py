"""The docker and swarm host providers against a recording stand-in for the Docker SDK's
client: what they ask the engine for (commands, labels, secrets, placement), what they adopt
after a restart, and what they refuse. The real engine: tests/integration/test_docker_provider.py
and test_swarm.py."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from nbcluster.gateway import (
    DockerHostProvider,
    GatewayConfig,
    HostProvider,
    HostProviderConfig,
    HostProviderError,
    HostTemplate,
    LocalProcessHostProvider,
    SwarmHostProvider,
    make_host_provider,
    parse_mount,
)
from nbcluster.gateway._container_hosts import file_store_dir, host_number, provider_id
from nbcluster.gateway._swarm_provider import (
    JOIN_TOKEN_PATH,
    choose_node,
    node_address,
    node_matches,
)

JOIN = "nbj_join-token-for-tests"
ADMIN = "the-admin-token"
_ids = itertools.count(1)


def _matches(labels: dict[str, str], filters: dict[str, Any] | None) -> bool:
    for wanted in (filters or {}).get("label", []):
        key, _, value = wanted.partition("=")
        if labels.get(key) != value:
            return False
    return True


@dataclass
class FakeContainer:
    kwargs: dict[str, Any]
    status: str = "running"
    id: str = field(default_factory=lambda: f"c{next(_ids):063d}")
    stopped: bool = False
    removed: bool = False

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.kwargs.get("labels") or {})

    def stop(self, timeout: int) -> None:
        self.stopped = True
        self.status = "exited"

    def remove(self, force: bool = False) -> None:
        self.removed = True


class FakeContainers:
    def __init__(self) -> None:
        self.all: list[FakeContainer] = []

    def run(self, image: str, **kwargs: Any) -> FakeContainer:
        if any(c.kwargs.get("name") == kwargs.get("name") and not c.removed for c in self.all):
            raise docker.errors.APIError(f"Conflict. The container name {kwargs['name']} is in use")
        c = FakeContainer({"image": image, **kwargs})
        self.all.append(c)
        return c

    def list(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[FakeContainer]:
        return [c for c in self.all if not c.removed and _matches(c.labels, filters)]

    def get(self, cid: str) -> FakeContainer:
        for c in self.all:
            if c.id == cid and not c.removed:
                return c
        raise docker.errors.NotFound(f"no container {cid}")


@dataclass
class FakeService:
    kwargs: dict[str, Any]
    id: str = field(default_factory=lambda: f"s{next(_ids):024d}")
    removed: bool = False

    @property
    def attrs(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Spec": {
                "Name": self.kwargs["name"],
                "Labels": self.kwargs.get("labels") or {},
                "TaskTemplate": {"Placement": {"Constraints": self.kwargs.get("constraints")}},
            },
        }

    def remove(self) -> None:
        self.removed = True


class FakeServices:
    def __init__(self) -> None:
        self.all: list[FakeService] = []

    def create(self, image: str, **kwargs: Any) -> FakeService:
        s = FakeService({"image": image, **kwargs})
        self.all.append(s)
        return s

    def list(self, filters: dict[str, Any] | None = None) -> list[FakeService]:
        return [
            s for s in self.all if not s.removed and _matches(s.attrs["Spec"]["Labels"], filters)
        ]

    def get(self, sid: str) -> FakeService:
        for s in self.all:
            if s.id == sid and not s.removed:
                return s
        raise docker.errors.NotFound(f"no service {sid}")

    def live(self) -> list[FakeService]:
        return [s for s in self.all if not s.removed]


@dataclass
class FakeNamed:
    name: str
    data: bytes
    labels: dict[str, str]
    id: str = field(default_factory=lambda: f"x{next(_ids):024d}")


class FakeNamedCollection:
    def __init__(self) -> None:
        self.all: list[FakeNamed] = []

    def create(self, name: str, data: bytes, labels: dict[str, str]) -> FakeNamed:
        item = FakeNamed(name, data, labels)
        self.all.append(item)
        return item

    def list(self, filters: dict[str, Any] | None = None) -> list[FakeNamed]:
        prefix = (filters or {}).get("name", "")
        return [i for i in self.all if i.name.startswith(prefix)]


@dataclass
class FakeNode:
    attrs: dict[str, Any]


def node(
    nid: str,
    hostname: str,
    addr: str,
    labels: dict[str, str] | None = None,
    state: str = "ready",
    availability: str = "active",
    role: str = "worker",
) -> dict[str, Any]:
    return {
        "ID": nid,
        "Spec": {"Labels": labels or {}, "Role": role, "Availability": availability},
        "Description": {
            "Hostname": hostname,
            "Platform": {"OS": "linux", "Architecture": "x86_64"},
        },
        "Status": {"State": state, "Addr": addr},
    }


class FakeNodes:
    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self.nodes = nodes

    def list(self) -> list[FakeNode]:
        return [FakeNode(n) for n in self.nodes]


class FakeClient:
    def __init__(self, nodes: list[dict[str, Any]] | None = None) -> None:
        self.containers = FakeContainers()
        self.services = FakeServices()
        self.secrets = FakeNamedCollection()
        self.configs = FakeNamedCollection()
        self.nodes = FakeNodes(nodes or [])
        self.closed = False

    def close(self) -> None:
        self.closed = True


def template(provider: str, tmp_path: Path, **settings: Any) -> HostTemplate:
    return HostTemplate(
        provider=provider,
        gateway_id="gw1234",
        gateway_url="http://10.0.0.1:8889",
        settings=HostProviderConfig(kind=provider, **settings),
        gpus_per_host=2,
        store_dir=tmp_path / "store",
    )


def flat(value: Any) -> str:
    return repr(value)


# -- docker ---------------------------------------------------------------------------------------


async def test_docker_hosts_are_labelled_containers_with_the_token_in_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCLUSTER_TOKEN", ADMIN)
    client = FakeClient()
    provider = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    assert isinstance(provider, HostProvider)
    assert await provider.start_hosts(2) == ["auto-1", "auto-2"]
    assert provider.started() == ["auto-1", "auto-2"]
    assert provider.owns("auto-1") and not provider.owns("auto-3")
    first = client.containers.all[0].kwargs
    assert first["image"] == "nbcluster:latest"
    assert first["name"] == "nbcluster-gw1234-auto-1"
    assert first["labels"] == {
        "nbcluster.provider": "docker",
        "nbcluster.gateway": "gw1234",
        "nbcluster.host": "auto-1",
        "nbcluster.role": "host",
    }
    assert first["command"] == [
        "host",
        "--gateway",
        "http://10.0.0.1:8889",
        "--name",
        "auto-1",
        "--log-level",
        "info",
        "--gpus",
        "2",
        "--address",
        "127.0.0.1",
    ]
    assert first["entrypoint"] is None  # the image's: nbcluster
    assert first["network_mode"] == "host"
    assert first["environment"] == {"NBCLUSTER_JOIN_TOKEN": JOIN}
    assert first["restart_policy"] == {"Name": "unless-stopped"}
    # The file store is mounted where the replicas are told it is.
    store = str(tmp_path / "store")
    assert [(m["Source"], m["Target"]) for m in first["mounts"]] == [(store, store)]
    everything = flat([c.kwargs for c in client.containers.all])
    assert ADMIN not in everything
    assert JOIN not in flat(first["command"]) + flat(first["entrypoint"])


async def test_docker_on_a_network_uses_the_containers_own_address(tmp_path: Path) -> None:
    client = FakeClient()
    provider = DockerHostProvider(
        template("docker", tmp_path, network="nbnet"), JOIN, client=client
    )
    await provider.start_hosts(1)
    kwargs = client.containers.all[0].kwargs
    assert kwargs["network"] == "nbnet" and "network_mode" not in kwargs
    assert kwargs["hostname"] == "auto-1"
    assert "--address" not in kwargs["command"]
    entrypoint = kwargs["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    assert '"$@"' in entrypoint[2] and "hostname -i" in entrypoint[2]
    # The arguments are separate words after the script, never part of it.
    assert "http://10.0.0.1:8889" not in entrypoint[2]


async def test_docker_adopts_its_own_containers_after_a_restart_and_only_those(
    tmp_path: Path,
) -> None:
    client = FakeClient()
    first = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    await first.start_hosts(2)
    # Another gateway's host, and a container nbcluster did not start, on the same engine.
    other = template("docker", tmp_path)
    client.containers.run(
        "nbcluster:latest",
        name="nbcluster-other-auto-9",
        labels={**other.labels("auto-9"), "nbcluster.gateway": "other"},
    )
    client.containers.run("postgres", name="db", labels={})
    await first.close()  # the containers stay by default
    assert [c.stopped for c in client.containers.all] == [False] * 4

    again = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    assert await again.discover() == ["auto-1", "auto-2"]
    assert again.owns("auto-2") and not again.owns("auto-9")
    with pytest.raises(HostProviderError, match=r"auto-9.*not started by the docker"):
        await again.stop_host("auto-9")
    assert await again.start_hosts(1) == ["auto-3"]  # numbering goes on
    await again.stop_host("auto-1")
    gone = client.containers.all[0]
    assert gone.stopped and gone.removed
    assert not again.owns("auto-1")
    assert not client.containers.all[2].stopped  # the other gateway's
    assert not client.containers.all[3].stopped


async def test_docker_stop_on_exit_removes_its_hosts(tmp_path: Path) -> None:
    client = FakeClient()
    provider = DockerHostProvider(
        template("docker", tmp_path, stop_on_exit=True), JOIN, client=client
    )
    await provider.start_hosts(2)
    await provider.close()
    assert all(c.removed for c in client.containers.all)
    assert client.closed
    with pytest.raises(HostProviderError, match="closed"):
        await provider.start_hosts(1)


async def test_docker_shares_out_real_gpus_and_remembers_them(tmp_path: Path) -> None:
    client = FakeClient()
    settings: dict[str, Any] = {"gpus": "nvidia", "gpu_devices": (0, 1, 2, 3, 4)}
    provider = DockerHostProvider(template("docker", tmp_path, **settings), JOIN, client=client)
    assert await provider.start_hosts(5) == ["auto-1", "auto-2"]  # 2 each: 5 GPUs feed two
    given = [c.kwargs["device_requests"][0]["DeviceIDs"] for c in client.containers.all]
    assert given == [["0", "1"], ["2", "3"]]
    assert client.containers.all[1].kwargs["labels"]["nbcluster.gpus"] == "2,3"
    assert "--gpus" not in client.containers.all[0].kwargs["command"]  # NVML finds them
    with pytest.raises(HostProviderError, match=r"no GPUs left.*2 per host, 1 of 5 free"):
        await provider.start_hosts(1)
    # A restarted gateway knows which devices its containers hold.
    again = DockerHostProvider(template("docker", tmp_path, **settings), JOIN, client=client)
    await again.discover()
    await again.stop_host("auto-1")
    assert await again.start_hosts(1) == ["auto-3"]
    assert client.containers.all[-1].kwargs["device_requests"][0]["DeviceIDs"] == ["0", "1"]


async def test_docker_engine_errors_name_what_failed(tmp_path: Path) -> None:
    client = FakeClient()
    provider = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    await provider.start_hosts(1)
    fresh = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    fresh._discovered = True  # as if the engine had answered "none" before the first start
    with pytest.raises(HostProviderError, match="start host container auto-1 from nbcluster"):
        await fresh.start_hosts(1)


# -- swarm ----------------------------------------------------------------------------------------

GPU = {"nbcluster.gpu": "true"}


def swarm_client() -> FakeClient:
    return FakeClient(
        [
            node("n1", "gpu-a", "10.0.0.11", GPU),
            node("n2", "gpu-b", "10.0.0.12", GPU),
            node("n3", "cpu-only", "10.0.0.13"),
            node("n4", "gpu-down", "10.0.0.14", GPU, state="down"),
            node("n5", "gpu-drained", "10.0.0.15", GPU, availability="drain"),
        ]
    )


async def test_swarm_hosts_are_one_pinned_service_each_reading_the_token_from_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCLUSTER_TOKEN", ADMIN)
    client = swarm_client()
    t = template("swarm", tmp_path, constraints=("node.labels.nbcluster.gpu==true",))
    provider = SwarmHostProvider(t, JOIN, client=client)
    assert isinstance(provider, HostProvider)
    assert await provider.start_hosts(3) == ["auto-1", "auto-2"]  # one per GPU node
    services = client.services.live()
    assert [s.kwargs["constraints"][-1] for s in services] == ["node.id==n1", "node.id==n2"]
    first = services[0].kwargs
    assert first["name"] == "nbcluster-gw1234-auto-1"
    assert first["constraints"][0] == "node.labels.nbcluster.gpu==true"
    assert first["labels"] == first["container_labels"] == t.labels("auto-1")
    assert first["mode"]["replicated"] == {"Replicas": 1}
    assert first["restart_policy"]["Condition"] == "any"
    assert first["networks"] == ["host"]
    assert first["command"] is None
    args = first["args"]
    assert args[args.index("--address") + 1] == "10.0.0.11"  # the node's, where replicas listen
    assert args[args.index("--join-token-file") + 1] == JOIN_TOKEN_PATH
    # One secret, made from the join token, named by a fingerprint of it, owned by the image's
    # user and readable by it only.
    (secret,) = client.secrets.all
    assert secret.data == JOIN.encode()
    assert secret.name.startswith("nbcluster-join-gw1234-")
    (ref,) = first["secrets"]
    assert ref["SecretName"] == secret.name
    assert ref["File"] == {"Name": JOIN_TOKEN_PATH, "UID": "1000", "GID": "1000", "Mode": 0o400}
    text = flat([s.kwargs for s in services])
    assert JOIN not in text and ADMIN not in text
    with pytest.raises(HostProviderError, match=r"no swarm node has room.*at most 1 per node"):
        await provider.start_hosts(1)
    assert len(client.secrets.all) == 1

    await provider.stop_host("auto-1")
    assert services[0].removed and not services[1].removed
    assert await provider.start_hosts(1) == ["auto-3"]  # n1 has room again
    assert client.services.live()[-1].kwargs["constraints"][-1] == "node.id==n1"


async def test_swarm_adopts_its_services_after_a_restart(tmp_path: Path) -> None:
    client = swarm_client()
    gpu_nodes = ("node.labels.nbcluster.gpu==true",)
    first = SwarmHostProvider(
        template("swarm", tmp_path, constraints=gpu_nodes), JOIN, client=client
    )
    await first.start_hosts(2)
    await first.close()
    assert len(client.services.live()) == 2  # they outlive the gateway by default
    again = SwarmHostProvider(
        template("swarm", tmp_path, constraints=gpu_nodes), JOIN, client=client
    )
    assert await again.discover() == ["auto-1", "auto-2"]
    assert again.owns("auto-1") and again.owns("auto-2")
    # Their nodes are known again: both GPU nodes are taken.
    with pytest.raises(HostProviderError, match="no swarm node has room"):
        await again.start_hosts(1)
    await again.stop_host("auto-2")
    assert await again.start_hosts(1) == ["auto-3"]
    assert client.services.live()[-1].kwargs["constraints"][-1] == "node.id==n2"
    stop_all = SwarmHostProvider(
        template("swarm", tmp_path, stop_on_exit=True), JOIN, client=client
    )
    assert await stop_all.discover() == ["auto-1", "auto-3"]
    await stop_all.close()
    assert client.services.live() == []


async def test_swarm_with_the_operators_secret_and_generic_gpus(tmp_path: Path) -> None:
    client = swarm_client()
    t = template("swarm", tmp_path, join_token_secret="cluster-join", gpus="nvidia")
    provider = SwarmHostProvider(t, JOIN, client=client)
    with pytest.raises(HostProviderError, match="secret 'cluster-join' does not exist"):
        await provider.start_hosts(1)
    client.secrets.create("cluster-join", b"whatever the operator put", {})
    assert await provider.start_hosts(1) == ["auto-1"]
    kwargs = client.services.live()[0].kwargs
    assert kwargs["secrets"][0]["SecretName"] == "cluster-join"
    assert len(client.secrets.all) == 1  # none made
    assert kwargs["resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}
    ]
    assert "--gpus" not in kwargs["args"]


async def test_swarm_gives_a_ca_as_a_config(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n...\n")
    client = swarm_client()
    provider = SwarmHostProvider(template("swarm", tmp_path, ca=ca), JOIN, client=client)
    await provider.start_hosts(1)
    kwargs = client.services.live()[0].kwargs
    (config,) = client.configs.all
    assert config.data == ca.read_bytes()
    assert kwargs["configs"][0]["File"]["Name"] == "/etc/nbcluster/ca.pem"
    assert kwargs["args"][kwargs["args"].index("--ca") + 1] == "/etc/nbcluster/ca.pem"
    assert all(m["Target"] != "/etc/nbcluster/ca.pem" for m in kwargs["mounts"])


def test_node_constraints() -> None:
    n = node("n1", "GPU-A", "10.0.0.11", {"nbcluster.gpu": "true", "zone": "b"}, role="manager")
    assert node_matches(n, "node.labels.nbcluster.gpu==true")
    assert not node_matches(n, "node.labels.nbcluster.gpu==TRUE")  # labels: exact
    assert node_matches(n, "node.hostname==gpu-a")  # attributes: any case
    assert node_matches(n, "node.role == manager")
    assert node_matches(n, "node.labels.zone!=a")
    assert not node_matches(n, "node.labels.missing==x")
    assert node_matches(n, "node.platform.os==linux")
    assert node_matches(n, "node.id==n1")
    with pytest.raises(HostProviderError, match="no == or !="):
        node_matches(n, "node.labels.zone")
    with pytest.raises(HostProviderError, match=r"'node\.ip' is not understood"):
        node_matches(n, "node.ip==10.0.0.11")


def test_choose_node_prefers_the_emptiest_fitting_node() -> None:
    nodes = swarm_client().nodes.nodes
    gpu = ["node.labels.nbcluster.gpu==true"]
    assert choose_node(nodes, gpu, {}, 1)["ID"] == "n1"  # type: ignore[index]
    assert choose_node(nodes, gpu, {"n1": 1}, 1)["ID"] == "n2"  # type: ignore[index]
    assert choose_node(nodes, gpu, {"n1": 1, "n2": 1}, 1) is None
    assert choose_node(nodes, gpu, {"n1": 1, "n2": 2}, 3)["ID"] == "n1"  # type: ignore[index]
    assert choose_node(nodes, [], {"n1": 1, "n2": 1}, 1)["ID"] == "n3"  # type: ignore[index]


def test_node_address() -> None:
    assert node_address(node("n", "h", "10.1.2.3")) == "10.1.2.3"
    manager = node("n", "h", "0.0.0.0")
    manager["ManagerStatus"] = {"Addr": "192.168.1.5:2377"}
    assert node_address(manager) == "192.168.1.5"
    with pytest.raises(HostProviderError, match="node n has no address"):
        node_address(node("n", "h", ""))


# -- shared pieces --------------------------------------------------------------------------------


def test_provider_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = provider_id(tmp_path / "gateway")
    assert first == provider_id(tmp_path / "gateway")
    assert len(first) == 12
    (tmp_path / "gateway" / "gateway-id").write_text("Not An Id!\n")
    with pytest.raises(HostProviderError, match="not a gateway id"):
        provider_id(tmp_path / "gateway")


def test_mounts_names_and_store_urls() -> None:
    assert parse_mount("/data:/data:ro").read_only
    m = parse_mount("nbstore:/store")
    assert (m.source, m.target, m.type, m.read_only) == ("nbstore", "/store", "volume", False)
    for bad in ("/data", "/a:relative", "/a:/b:rw:x", "/a:/b:rx", ":/b"):
        with pytest.raises(ValueError, match="mount"):
            parse_mount(bad)
    assert host_number("auto-12", "auto") == 12
    assert host_number("auto-x", "auto") is None and host_number("other-1", "auto") is None
    assert file_store_dir("file:///srv/nb%20store") == Path("/srv/nb store")
    assert file_store_dir("redis://r:6379/0") is None


def test_template_refuses_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not http"):
        HostTemplate("docker", "g", "ws://x", HostProviderConfig(kind="docker"), 1)
    with pytest.raises(ValueError, match="at least 1 GPU"):
        HostTemplate("docker", "g", "http://x", HostProviderConfig(gpus="nvidia"), 0)
    with pytest.raises(ValueError, match="mount"):
        HostTemplate("docker", "g", "http://x", HostProviderConfig(mounts=("nope",)), 1)


def test_advertised_url_and_the_provider_the_gateway_makes(tmp_path: Path) -> None:
    base = GatewayConfig(token="t", ip="0.0.0.0", port=9999, state_dir=tmp_path / "gw")
    assert base.advertised_url == "http://127.0.0.1:9999"
    public = GatewayConfig(token="t", port=9999, public_url="http://gw.example:80/")
    assert public.advertised_url == "http://gw.example:80"
    local = make_host_provider(base, JOIN, "info")
    assert isinstance(local, LocalProcessHostProvider)
    assert local.gateway_url == "http://127.0.0.1:9999"
    swarm = make_host_provider(
        GatewayConfig(
            token="t",
            state_dir=tmp_path / "gw",
            public_url="http://10.0.0.1:8889",
            host_provider=HostProviderConfig(kind="swarm"),
        ),
        JOIN,
        "debug",
    )
    assert isinstance(swarm, SwarmHostProvider)
    assert swarm.template.gateway_url == "http://10.0.0.1:8889"
    assert swarm.template.gateway_id == provider_id(tmp_path / "gw")
    docker_provider = make_host_provider(
        GatewayConfig(
            token="t",
            state_dir=tmp_path / "gw",
            store_url="redis://r:6379/0",
            host_provider=HostProviderConfig(kind="docker"),
        ),
        JOIN,
        "info",
    )
    assert isinstance(docker_provider, DockerHostProvider)
    assert docker_provider.template.store_dir is None


async def test_a_provider_host_down_for_a_moment_still_counts_against_max_hosts(
    tmp_path: Path,
) -> None:
    """A host container the engine restarts (a Swarm task being replaced) comes back by
    itself: the auto-scaler must not start another in its place past ``max_hosts``."""
    from .test_autoscaler import Env, config

    env = Env(config(min_hosts=3, max_hosts=3))
    client = FakeClient()
    provider = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    env.autoscaler.provider = provider
    assert await provider.start_hosts(3) == ["auto-1", "auto-2", "auto-3"]
    env.arrive("auto-1")
    env.arrive("auto-2")  # auto-3 is being restarted: not connected
    await env.autoscaler._scale_out(1, "a kernel found no room")
    assert len(client.containers.all) == 3
    assert env.scale_events("out", "ok") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--public-url", "gateway:8889"], "'gateway:8889' is not an http(s) URL"),
        (["--hosts-from", "docker", "--host-mount", "/data"], "is not SOURCE:TARGET"),
        (["--hosts-from", "docker", "--host-gpus", "nvidia"], "needs --host-gpu-devices"),
        (["--hosts-from", "swarm", "--host-user", "nbcluster"], "is not UID or UID:GID"),
        (["--hosts-from", "k8s"], "'k8s' is not one of"),
    ],
)
def test_gateway_host_options_are_checked(args: list[str], message: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nbcluster.cli._daemons import gateway_command

    result = CliRunner().invoke(
        gateway_command, ["--token", "t", "--state-dir", str(tmp_path), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_gateway_token_files_must_not_be_empty(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nbcluster.cli._daemons import gateway_command

    empty = tmp_path / "admin-token"
    empty.write_text("\n")
    result = CliRunner().invoke(
        gateway_command, ["--token-file", str(empty), "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "is empty" in result.output and "--token-file" in result.output


async def test_docker_forgets_a_container_removed_by_hand(tmp_path: Path) -> None:
    client = FakeClient()
    provider = DockerHostProvider(template("docker", tmp_path), JOIN, client=client)
    await provider.start_hosts(2)
    client.containers.all[0].removed = True  # docker rm -f, outside nbcluster
    assert await provider.discover() == ["auto-2"]
    assert provider.started() == ["auto-2"] and not provider.owns("auto-1")
    assert await provider.start_hosts(1) == ["auto-3"]  # names are never reused


async def test_swarm_hosts_on_a_node_that_is_down_do_not_count_and_a_gone_node_loses_them(
    tmp_path: Path,
) -> None:
    client = swarm_client()
    gpu_nodes = ("node.labels.nbcluster.gpu==true",)
    provider = SwarmHostProvider(
        template("swarm", tmp_path, constraints=gpu_nodes), JOIN, client=client
    )
    assert await provider.start_hosts(2) == ["auto-1", "auto-2"]  # on n1 and n2
    client.nodes.nodes[0]["Status"]["State"] = "down"
    await provider.discover()
    assert provider.started() == ["auto-2"]
    assert provider.owns("auto-1")  # still its own: stop_host works on it
    client.nodes.nodes[0]["Status"]["State"] = "ready"
    await provider.discover()
    assert provider.started() == ["auto-1", "auto-2"]
    del client.nodes.nodes[1]  # n2 left the swarm: its service can never run again
    assert await provider.discover() == ["auto-1"]
    assert [s.kwargs["name"] for s in client.services.live()] == ["nbcluster-gw1234-auto-1"]
