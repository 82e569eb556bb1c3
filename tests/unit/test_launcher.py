"""The replica launcher seam (``_launcher``): the host-daemon launcher against a fake host
daemon, and ``Replicas`` (start, stop, signal one replica) against a fake launcher, as a
Docker or Kubernetes provider would plug in."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from nbcluster import envvars
from nbcluster.gateway import (
    GatewayConfig,
    HostRegistry,
    HostSession,
    KernelSpecRegistry,
    KernelStartError,
)
from nbcluster.gateway._host_launcher import HostDaemonLauncher
from nbcluster.gateway._launcher import (
    LaunchError,
    LaunchSpec,
    ReplicaExit,
    ReplicaLauncher,
    ReplicaProcess,
)
from nbcluster.gateway._replicas import Replicas
from nbcluster.hostproto import (
    ConnectionInfo,
    Hello,
    HostResources,
    ReplicaExited,
    Reply,
    SignalReplica,
    StartReplica,
    StopReplica,
    decode_gateway_message,
)
from nbcluster.identity import KernelTokens

from .fakes import make_kernel

CONNECTION = ConnectionInfo(
    ip="10.0.0.7",
    shell_port=11,
    iopub_port=12,
    stdin_port=13,
    control_port=14,
    hb_port=15,
    raft_port=16,
)


class FakeHostDaemon:
    """A host daemon behind a HostSession: answers each request as ``answer`` says."""

    def __init__(self, registry: HostRegistry, name: str = "h1") -> None:
        self.requests: list[Any] = []
        self.error = ""
        self.session = HostSession(name, self._receive)
        registry.register(
            Hello(name=name, address="10.0.0.7", resources=HostResources(cpus=4, memory_mb=1024)),
            self.session,
            now=0.0,
        )

    async def _receive(self, frame: str) -> None:
        request = decode_gateway_message(frame)
        self.requests.append(request)
        if self.error:
            reply = Reply(request_id=request.request_id, ok=False, error=self.error)
        elif isinstance(request, StartReplica):
            result = {
                "kernel_id": request.kernel_id,
                "replica_id": request.replica_id,
                "pid": 4242,
                "connection": CONNECTION.model_dump(),
            }
            reply = Reply(request_id=request.request_id, ok=True, result=result)
        else:
            reply = Reply(request_id=request.request_id, ok=True)
        asyncio.get_running_loop().call_soon(self.session.on_reply, reply)


def spec(host: str = "h1", replica_id: str = "r1") -> LaunchSpec:
    return LaunchSpec(
        kernel_id="k1",
        replica_id=replica_id,
        host=host,
        argv=("python", "-m", "nbcluster.kernel", "-f", "{connection_file}"),
        env={"A": "1"},
        key="secret",
        working_dir="/work",
        launch_timeout=7.0,
    )


def launcher_with_host() -> tuple[HostDaemonLauncher, FakeHostDaemon, list[ReplicaExit]]:
    registry = HostRegistry(lost_timeout=5)
    host = FakeHostDaemon(registry)
    exits: list[ReplicaExit] = []
    return HostDaemonLauncher(registry, on_exit=exits.append), host, exits


# -- the host-daemon launcher -----------------------------------------------------------------


async def test_launch_sends_the_spec_to_the_host_and_returns_a_running_process() -> None:
    launcher, host, _ = launcher_with_host()
    process = await launcher.launch(spec())
    [start] = host.requests
    assert isinstance(start, StartReplica)
    assert (start.kernel_id, start.replica_id, start.key, start.working_dir) == (
        "k1",
        "r1",
        "secret",
        "/work",
    )
    assert start.argv == ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"]
    assert (start.env, start.launch_timeout) == ({"A": "1"}, 7.0)
    assert (process.replica_id, process.host, process.pid) == ("r1", "h1", 4242)
    assert process.connection == CONNECTION
    assert process.poll() is None
    # The same replica, attached again (a host's hello), is the same handle.
    assert launcher.attach("h1", "r1", 4242, CONNECTION) is process


async def test_signal_terminate_and_kill_reach_the_host() -> None:
    launcher, host, _ = launcher_with_host()
    process = await launcher.launch(spec())
    await process.send_signal(signal.SIGINT)
    await process.terminate(grace=2.0)
    await process.kill()
    _, sig, stop, kill = host.requests
    assert isinstance(sig, SignalReplica) and (sig.replica_id, sig.signum) == ("r1", signal.SIGINT)
    assert isinstance(stop, StopReplica) and (stop.replica_id, stop.grace) == ("r1", 2.0)
    assert isinstance(kill, StopReplica) and kill.grace == 0.0


async def test_host_errors_become_launch_errors_with_the_host_s_words() -> None:
    launcher, host, _ = launcher_with_host()
    host.error = "spawn failed: no such file"
    with pytest.raises(LaunchError, match="spawn failed: no such file"):
        await launcher.launch(spec())
    with pytest.raises(LaunchError, match="host h9 is not connected"):
        await launcher.launch(spec(host="h9"))
    process = launcher.attach("h1", "r2", None, None)
    with pytest.raises(LaunchError, match="spawn failed"):
        await process.send_signal(signal.SIGINT)
    with pytest.raises(LaunchError, match="spawn failed"):
        await process.terminate()


async def test_an_exit_the_host_reports_ends_the_process_and_reaches_the_listener() -> None:
    launcher, _, exits = launcher_with_host()
    process = await launcher.launch(spec())
    waiter = asyncio.create_task(process.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    event = ReplicaExited(
        kernel_id="k1", replica_id="r1", exit_code=-9, requested=False, log_tail="Killed"
    )
    launcher.host_reported_exit("h1", event)
    assert await asyncio.wait_for(waiter, 1) == -9
    assert process.poll() == -9
    assert exits == [ReplicaExit("k1", "r1", "h1", -9, "Killed")]
    # Exits of replicas it holds no handle for are reported too (a restarted gateway).
    other = ReplicaExited(kernel_id="k2", replica_id="r7", exit_code=None, requested=True)
    launcher.host_reported_exit("h1", other)
    assert exits[-1] == ReplicaExit("k2", "r7", "h1", None, "")


async def test_an_unknown_exit_code_reads_as_minus_one() -> None:
    launcher, _, _ = launcher_with_host()
    process = launcher.attach("h1", "r3", 99, CONNECTION)
    launcher.host_reported_exit(
        "h1", ReplicaExited(kernel_id="k1", replica_id="r3", exit_code=None, requested=True)
    )
    assert process.poll() == -1
    assert await process.wait() == -1


# -- Replicas over any launcher ---------------------------------------------------------------


class FakeProcess:
    """A replica process as a provider's launcher would hand it back."""

    def __init__(self, spec: LaunchSpec, log: list[tuple[str, Any]]) -> None:
        self.spec = spec
        self.log = log
        self.returncode: int | None = None
        self.exited = asyncio.Event()

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    @property
    def host(self) -> str:
        return self.spec.host

    @property
    def pid(self) -> int | None:
        return 77

    @property
    def connection(self) -> ConnectionInfo | None:
        return CONNECTION

    def poll(self) -> int | None:
        return self.returncode

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def send_signal(self, signum: int) -> None:
        self.log.append(("signal", (self.replica_id, signum)))

    async def terminate(self, grace: float = 2.0) -> None:
        self.log.append(("terminate", (self.replica_id, grace)))
        self.returncode = -15
        self.exited.set()

    async def kill(self) -> None:
        self.log.append(("kill", self.replica_id))
        self.returncode = -9
        self.exited.set()


class FakeLauncher:
    """An in-memory launcher (say, of containers): records what it is asked."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.processes: dict[str, FakeProcess] = {}
        self.fail = ""

    async def launch(self, spec: LaunchSpec) -> ReplicaProcess:
        self.log.append(("launch", spec))
        if self.fail:
            raise LaunchError(self.fail)
        process = self.processes[spec.replica_id] = FakeProcess(spec, self.log)
        return process

    def attach(
        self, host: str, replica_id: str, pid: int | None, connection: ConnectionInfo | None
    ) -> ReplicaProcess:
        process = self.processes.get(replica_id)
        if process is None:
            process = FakeProcess(
                LaunchSpec(kernel_id="?", replica_id=replica_id, host=host, argv=()), self.log
            )
            self.processes[replica_id] = process
        return process


KERNEL_TOKENS = KernelTokens(b"k" * 32)


def replicas_with(launcher: ReplicaLauncher, **config: Any) -> Replicas:
    settings: dict[str, Any] = {"token": "tok", "store_dir": Path("/tmp/nbc-store"), **config}
    return Replicas(GatewayConfig(**settings), KernelSpecRegistry(), launcher, KERNEL_TOKENS)


def test_the_launch_spec_carries_the_kernelspec_the_client_env_and_nbcluster_s_variables() -> None:
    kernel, _ = make_kernel()
    kernel.record.env = {"KERNEL_WORKING_DIR": "/nb", "KERNEL_FOO": "bar"}
    kernel.record.working_dir = "/nb"
    kernel.record.raft_password = "pw"
    replicas = replicas_with(FakeLauncher(), ip="0.0.0.0", port=9000, store_threshold=123)
    launch = replicas.launch_spec(kernel, "h2", "r9", devices=(0, 2))
    assert (launch.kernel_id, launch.replica_id, launch.host) == (kernel.id, "r9", "h2")
    assert "{connection_file}" in " ".join(launch.argv)
    assert (launch.key, launch.working_dir, launch.launch_timeout) == ("secret", "/nb", 30.0)
    env = launch.env
    assert env["KERNEL_FOO"] == "bar"
    assert env[envvars.RAFT_PASSWORD.name] == "pw"
    assert env[envvars.STORE_URL.name] == Path("/tmp/nbc-store").as_uri()
    assert env[envvars.STORE_THRESHOLD.name] == "123"
    # A wildcard address is reached on loopback.
    assert env[envvars.GATEWAY_URL.name] == "http://127.0.0.1:9000"
    # The kernel's own token, never the admin's.
    assert env[envvars.GATEWAY_TOKEN.name] == KERNEL_TOKENS.issue(kernel.id) != "tok"
    assert KERNEL_TOKENS.kernel_of(env[envvars.GATEWAY_TOKEN.name]) == kernel.id
    assert env[envvars.GPUS.name] == env[envvars.CUDA_VISIBLE_DEVICES.name] == "0,2"
    without = replicas_with(FakeLauncher()).launch_spec(kernel, "h2", "r9")
    assert envvars.GPUS.name not in without.env
    assert envvars.CUDA_VISIBLE_DEVICES.name not in without.env


async def test_a_replica_the_launcher_cannot_start_is_dead_with_its_reason() -> None:
    kernel, _ = make_kernel()
    launcher = FakeLauncher()
    launcher.fail = "no room for the container"
    replicas = replicas_with(launcher)
    with pytest.raises(
        KernelStartError, match="replica on host h1 failed to start: no room for the container"
    ):
        await replicas.launch(kernel, "h1", "r1")
    [record] = kernel.record.replicas
    assert (record.replica_id, record.host, record.state) == ("r1", "h1", "dead")
    assert record.reason == "no room for the container"


async def test_stop_asks_the_replica_to_shut_down_then_has_the_launcher_stop_it() -> None:
    kernel, links = make_kernel("r1", "r2")
    launcher = FakeLauncher()
    replicas = replicas_with(launcher)
    links["r1"].on_send = lambda msg: None  # it never answers: the stop goes on after 1 s
    replica = kernel.record.replicas[0]
    await replicas.stop(kernel, replica)
    assert [m.msg_type for m in links["r1"].sent] == ["shutdown_request"]
    assert links["r1"].closed and "r1" not in kernel.links
    assert replica.state == "stopped"
    assert launcher.log == [("terminate", ("r1", 2.0))]
    # Stopping it again (already stopped) asks nothing more.
    await replicas.stop(kernel, replica)
    assert launcher.log == [("terminate", ("r1", 2.0))]


async def test_a_stop_the_launcher_refuses_is_not_an_error() -> None:
    class Refusing(FakeLauncher):
        def attach(
            self, host: str, replica_id: str, pid: int | None, connection: ConnectionInfo | None
        ) -> ReplicaProcess:
            process = super().attach(host, replica_id, pid, connection)

            async def terminate(grace: float = 2.0) -> None:
                raise LaunchError("host h1 is not connected")

            process.terminate = terminate  # type: ignore[method-assign]
            return process

    kernel, _ = make_kernel("r1")
    replica = kernel.record.replicas[0]
    replica.state = "unknown"  # after a gateway restart: no shutdown reply comes either
    del kernel.links["r1"]
    await replicas_with(Refusing()).stop(kernel, replica)
    assert replica.state == "stopped"


async def test_signal_goes_to_the_replica_s_process() -> None:
    kernel, _ = make_kernel("r1")
    launcher = FakeLauncher()
    await replicas_with(launcher).signal(kernel.record.replicas[0], signal.SIGINT)
    assert launcher.log == [("signal", ("r1", signal.SIGINT))]
