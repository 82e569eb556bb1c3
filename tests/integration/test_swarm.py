"""nbcluster on the one-node Docker Swarm here: host daemons as Swarm service tasks (the
``swarm`` host provider of a gateway run as a local process), and the stack file.

* A replicated kernel on three host tasks: ``docker kill`` of the executor's host container,
  and the next cell has every variable; a replacement replica starts on a new task.
* The auto-scaler adds a host service under GPU pressure and removes it once idle.
* ``docker stack deploy -c deploy/swarm/stack.yml`` serves a cell end to end, then
  ``docker stack rm`` leaves nothing behind.

Host daemons use host networking: their replicas listen on the node's address (127.0.0.1 on
this swarm), where the gateway reaches them. Everything the tests create is labelled or named
after the test and removed at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nbcluster.client import GatewayClient

from ..cluster import Cluster, async_wait_for, free_port, wait_for
from ..engine import TEST_LABEL

# One Docker engine and one swarm node for every test that uses them: `make test` runs tests
# on two workers (pytest-xdist), and these go to the same one, one at a time.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("engine")]

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "deploy" / "swarm" / "stack.yml"
GPU_LABEL = "nbcluster.gpu"


@pytest.fixture(scope="module")
def engine(engine: Any) -> Any:
    """The engine (conftest.py), which must be in a swarm."""
    state = engine.info()["Swarm"]["LocalNodeState"]
    assert state == "active", f"this engine is not in a swarm ({state}): deploy/docker/engine-up.sh"
    return engine


@pytest.fixture(scope="module")
def gpu_node(engine: Any) -> Iterator[str]:
    """This node, labelled ``nbcluster.gpu=true`` (what the stack and the tests' constraint
    select); the label is taken off again if this fixture put it there."""
    node = engine.nodes.get(engine.info()["Swarm"]["NodeID"])
    added = node.attrs["Spec"].get("Labels", {}).get(GPU_LABEL) != "true"
    if added:
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {**spec.get("Labels", {}), GPU_LABEL: "true"}})
    try:
        yield str(node.id)
    finally:
        if added:
            node.reload()
            spec = node.attrs["Spec"]
            labels = {k: v for k, v in spec.get("Labels", {}).items() if k != GPU_LABEL}
            node.update({**spec, "Labels": labels})


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """An object store every replica reaches, whichever container it runs in (host
    networking): a redis-server of this module's own, on a free port."""
    import redis

    server_bin = shutil.which("redis-server")
    assert server_bin, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    server = subprocess.Popen(
        [
            server_bin,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        wait_for(lambda: bool(client.ping()), 20, "redis-server to answer")
        yield f"redis://127.0.0.1:{port}/0?prefix=swarm-tests/"
    finally:
        client.close()
        server.terminate()
        server.wait(10)


@pytest.fixture
def gateway_id(engine: Any) -> Iterator[str]:
    """The id the test's gateway labels its services and secrets with; whatever carries it
    is removed at the end."""
    gid = f"t{secrets.token_hex(5)}"
    try:
        yield gid
    finally:
        _remove_labelled(engine, gid)


def _remove_labelled(engine: Any, gid: str) -> None:
    label = {"label": f"nbcluster.gateway={gid}"}
    for service in engine.services.list(filters=label):
        with contextlib.suppress(Exception):  # gone meanwhile
            service.remove()
    # A secret cannot go while a task that uses it is still there.
    wait_for(lambda: not engine.containers.list(all=True, filters=label), 60, "host tasks to end")
    for secret in engine.secrets.list(filters=label):
        secret.remove()


def _services(engine: Any, gid: str) -> dict[str, Any]:
    """The gateway's host services, by host name."""
    found = engine.services.list(filters={"label": f"nbcluster.gateway={gid}"})
    return {s.attrs["Spec"]["Labels"]["nbcluster.host"]: s for s in found}


def _container_of(engine: Any, gid: str, host: str) -> Any:
    """The running container of host ``host``'s task."""
    (container,) = engine.containers.list(
        filters={"label": [f"nbcluster.gateway={gid}", f"nbcluster.host={host}"]}
    )
    return container


def _swarm_cluster(
    tmp_path: Path, gid: str, image: str, redis_url: str, replicas: int, *extra: str
) -> Cluster:
    state = tmp_path / "state"
    (state / "gateway").mkdir(parents=True)
    (state / "gateway" / "gateway-id").write_text(gid + "\n")
    args = [
        "--hosts-from", "swarm", "--host-image", image, "--hosts-per-node", "4",
        "--host-constraint", f"node.labels.{GPU_LABEL}==true", "--scaling-interval", "0.5",
        "--scaling-gpus-per-host", "1", "--store", redis_url, "--stop-hosts-on-exit",
    ]  # fmt: skip
    return Cluster(state, hosts=0, replicas=replicas, gateway_args=[*args, *extra])


def _running(cluster: Cluster, kernel_id: str) -> list[dict[str, Any]]:
    return [r for r in cluster.replicas(kernel_id) if r["state"] == "running"]


async def test_a_killed_host_task_is_replaced_and_the_kernel_keeps_every_variable(
    tmp_path: Path, engine: Any, image: str, gpu_node: str, redis_url: str, gateway_id: str
) -> None:
    cluster = _swarm_cluster(
        tmp_path, gateway_id, image, redis_url, 3, "--min-hosts", "3", "--max-hosts", "3"
    )
    try:
        cluster.start_gateway()
        wait_for(lambda: len(cluster.connected_hosts()) == 3, 90, "three host tasks to register")
        services = _services(engine, gateway_id)
        assert sorted(services) == ["auto-1", "auto-2", "auto-3"]
        spec = services["auto-1"].attrs["Spec"]
        assert f"node.id=={gpu_node}" in spec["TaskTemplate"]["Placement"]["Constraints"]
        assert [s["File"]["Name"] for s in spec["TaskTemplate"]["ContainerSpec"]["Secrets"]] == [
            "/run/secrets/nbcluster-join-token"
        ]
        assert cluster.join_token not in str(spec) and cluster.token not in str(spec)

        async with GatewayClient(cluster.url, cluster.token) as gw:
            kid = (await gw.start_kernel())["id"]
            assert len({r["host"] for r in _running(cluster, kid)}) == 3
            async with gw.channels(kid) as channels:
                result = await channels.execute("x = 41\ndef f():\n    return x + 1", 60)
                assert result.status == "ok", result.reply

                async def committed() -> bool:
                    reply = await channels.request("shell", "kernel_info_request", {}, 15)
                    return int(reply["content"]["nbcluster"]["last_term"]) >= 1

                await async_wait_for(committed, 20, "the first cell's state to be committed")
                summary = cluster.kernel_summary(kid)
                executor = next(
                    r for r in _running(cluster, kid) if r["replica_id"] == summary["executor"]
                )
                killed = _container_of(engine, gateway_id, executor["host"])
                old_tasks = {t["ID"] for t in services[executor["host"]].tasks()}
                killed.kill()
                # Once the gateway knows (the host's websocket closed), the next cell goes to a
                # survivor rather than to the dying executor (docs/replication.md, "Failures").
                await async_wait_for(
                    lambda: (
                        executor["replica_id"]
                        not in {r["replica_id"] for r in _running(cluster, kid)}
                    ),
                    30,
                    "the gateway to see the executor's host go",
                )

                result = await channels.execute("print(f(), x)", 60)
                assert result.status == "ok", result.reply
                assert result.stream_text() == "42 41\n"

                # No room for a fourth host: the lost replica is replaced on the task Swarm
                # started for the killed host (same name, new task, new container).
                def replaced() -> bool:
                    running = {r["replica_id"]: r["host"] for r in _running(cluster, kid)}
                    return len(running) == 3 and executor["replica_id"] not in running

                await async_wait_for(replaced, 90, "a replacement replica to join")
                hosts = {r["host"] for r in _running(cluster, kid)}
                assert hosts == {"auto-1", "auto-2", "auto-3"}
                assert _container_of(engine, gateway_id, executor["host"]).id != killed.id
                result = await channels.execute("print(f() + 1)", 60)
                assert result.stream_text() == "43\n", result.outputs
            # Swarm replaced the killed task with a new one for the same host.
            service = _services(engine, gateway_id)[executor["host"]]
            running = [t for t in service.tasks() if t["Status"]["State"] == "running"]
            assert running and running[0]["ID"] not in old_tasks
            await gw.shutdown_kernel(kid)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
    # --stop-hosts-on-exit: the gateway removed its services as it stopped.
    assert _services(engine, gateway_id) == {}


async def test_the_auto_scaler_adds_a_host_service_under_gpu_pressure_and_removes_it_idle(
    tmp_path: Path, engine: Any, image: str, gpu_node: str, redis_url: str, gateway_id: str
) -> None:
    cluster = _swarm_cluster(
        tmp_path, gateway_id, image, redis_url, 1, "--min-hosts", "1", "--max-hosts", "2"
    )
    try:
        cluster.start_gateway()
        wait_for(lambda: cluster.connected_hosts() == ["auto-1"], 90, "auto-1 to register")
        async with GatewayClient(cluster.url, cluster.token) as gw:
            kid = (await gw.start_kernel(env={"KERNEL_GPUS": "1"}))["id"]
            async with gw.channels(kid) as channels:
                # A cell that holds the host's only GPU until it is interrupted.
                cell = asyncio.create_task(
                    channels.execute("import time\nfor _ in range(1200): time.sleep(0.1)", 150)
                )

                def grown() -> bool:
                    return sorted(cluster.connected_hosts()) == ["auto-1", "auto-2"]

                await async_wait_for(grown, 90, "a second host service under GPU pressure")
                assert sorted(_services(engine, gateway_id)) == ["auto-1", "auto-2"]
                await gw.interrupt_kernel(kid)
                result = await cell
                assert result.status == "error", result.reply

                def shrunk() -> bool:
                    return sorted(_services(engine, gateway_id)) == ["auto-1"]

                await async_wait_for(shrunk, 60, "the idle host service to be removed")
                await async_wait_for(
                    lambda: cluster.connected_hosts() == ["auto-1"], 30, "auto-2 to leave"
                )
                # The kernel's host stayed, and still runs it.
                result = await channels.execute("print('still here')", 60)
                assert result.stream_text() == "still here\n"
            await gw.shutdown_kernel(kid)
        assert cluster.metric("nbcluster_scale_events_total", direction="out", outcome="ok") == 2
        assert cluster.metric("nbcluster_scale_events_total", direction="in", outcome="ok") == 1
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def _docker(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def test_the_stack_serves_a_cell_end_to_end(
    tmp_path: Path, engine: Any, image: str, gpu_node: str
) -> None:
    name = f"nbt{secrets.token_hex(4)}"
    admin, join = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    labels = {TEST_LABEL: name}
    made = [
        engine.secrets.create(name=f"{name}-admin", data=admin.encode(), labels=labels),
        engine.secrets.create(name=f"{name}-join", data=join.encode(), labels=labels),
    ]
    store = tmp_path / "store"
    store.mkdir()
    os.chown(store, 1000, 1000)  # the image's user
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NBCLUSTER_IMAGE": image,
        "NBCLUSTER_IP": "127.0.0.1",
        "NBCLUSTER_PORT": str(port),
        "NBCLUSTER_PUBLIC_URL": url,
        "NBCLUSTER_REPLICAS": "1",
        "NBCLUSTER_HOST_GPUS": "2",
        "NBCLUSTER_STORE_DIR": str(store),
        "NBCLUSTER_ADMIN_TOKEN_SECRET": f"{name}-admin",
        "NBCLUSTER_JOIN_TOKEN_SECRET": f"{name}-join",
    }
    namespace = {"label": f"com.docker.stack.namespace={name}"}
    http = httpx.Client(base_url=url, headers={"Authorization": f"token {admin}"}, timeout=30)
    try:
        _docker("stack", "deploy", "-c", str(STACK), name, env=env)
        services = {s.name for s in engine.services.list(filters=namespace)}
        assert services == {f"{name}_gateway", f"{name}_hosts"}
        wait_for(lambda: http.get("/api").status_code == 200, 90, "the stack's gateway")
        assert http.get("/api", headers={"Authorization": "token wrong"}).status_code == 403

        def host_up() -> bool:
            hosts = http.get("/api/cluster/hosts").json()
            return [(h["name"], h["state"]) for h in hosts] == [
                (engine.info()["Name"], "connected")
            ]

        wait_for(host_up, 90, "the stack's host daemon to register")

        async def one_cell() -> None:
            async with GatewayClient(url, admin) as gw:
                kid = (await gw.start_kernel())["id"]
                async with gw.channels(kid) as channels:
                    result = await channels.execute(
                        "import os, sys\nprint(sys.prefix, os.getuid(), 6 * 7)", 60
                    )
                    assert result.status == "ok", result.reply
                    assert result.stream_text() == "/opt/nbcluster 1000 42\n"
                await gw.shutdown_kernel(kid)

        asyncio.run(one_cell())
        # Neither token is on a command line or in an environment of the stack's containers.
        for container in engine.containers.list(filters=namespace):
            config = str(container.attrs["Config"]) + str(container.attrs["Args"])
            assert admin not in config and join not in config
    except BaseException:
        for service in engine.services.list(filters=namespace):
            print(f"===== {service.name}")
            print(
                b"".join(service.logs(stdout=True, stderr=True, tail=60)).decode(errors="replace")
            )
        raise
    finally:
        http.close()
        with contextlib.suppress(AssertionError):
            _docker("stack", "rm", name)
        wait_for(
            lambda: not engine.containers.list(all=True, filters=namespace),
            60,
            f"the containers of stack {name} to go",
        )
        for volume in engine.volumes.list(filters=namespace):
            volume.remove()
        for secret in made:
            secret.remove()
    assert engine.services.list(filters=namespace) == []
    assert engine.configs.list(filters=namespace) == []


def test_the_redis_overlay_merges_into_the_stack() -> None:
    """stack.redis.yml (not deployed here: no Redis image can be pulled) is a valid overlay:
    the gateway keeps its tokens from secrets and gets Redis for jobs and objects."""
    import yaml

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NBCLUSTER_REDIS_HOST": "10.0.0.5",
    }
    merged = yaml.safe_load(
        _docker(
            "stack",
            "config",
            "-c",
            str(STACK),
            "-c",
            str(STACK.with_name("stack.redis.yml")),
            env=env,
        )
    )
    command = merged["services"]["gateway"]["command"]
    assert "--redis=redis://10.0.0.5:6379/0" in command
    assert "--store=redis://10.0.0.5:6379/1?prefix=nbcluster/" in command
    assert "--token-file=/run/secrets/nbcluster-admin-token" in command
    assert merged["services"]["redis"]["command"][:3] == ["redis-server", "--bind", "10.0.0.5"]
    assert merged["services"]["hosts"]["deploy"]["mode"] == "global"
