"""Autoscaler: capacity rounds and reactive scale-out carried out through a fake host provider,
with a real HostRegistry and scheduler driver fed as the host endpoint and kernel manager
would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nbcluster.gateway import HostProviderError, HostRegistry, HostSession
from nbcluster.gateway._autoscaler import Autoscaler
from nbcluster.gateway._driver import Placement, Refusal, SchedulerDriver, host_spec
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.hostproto import GpuInfo, Hello, HostResources
from nbcluster.scheduling import (
    HostAdded,
    Resources,
    ScaleIn,
    ScaleOut,
    ScalingConfig,
)


class FakeProvider:
    """A host provider that launches nothing: it names hosts ``auto-<n>`` and records calls.

    ``hold`` (when set) keeps ``start_hosts`` waiting until it is set; ``start_error`` and
    ``stop_errors`` make calls fail as a real provider's would."""

    name = "fake"

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.stops: list[str] = []
        self.closed = False
        self.hold: asyncio.Event | None = None
        self.start_error: Exception | None = None
        self.stop_errors: set[str] = set()
        self._owned: set[str] = set()
        self._live: list[str] = []
        self._n = 0

    async def start_hosts(self, count: int) -> list[str]:
        self.starts.append(count)
        if self.hold is not None:
            await self.hold.wait()
        if self.start_error is not None:
            raise self.start_error
        names = []
        for _ in range(count):
            self._n += 1
            names.append(f"auto-{self._n}")
        self._owned.update(names)
        self._live += names
        return names

    async def stop_host(self, name: str) -> None:
        self.stops.append(name)
        if name not in self._owned:
            raise HostProviderError(f"host {name!r} was not started by the fake provider")
        if name in self.stop_errors:
            raise HostProviderError(f"host daemon {name} did not exit after SIGKILL")
        if name in self._live:
            self._live.remove(name)

    def owns(self, name: str) -> bool:
        return name in self._owned

    def started(self) -> list[str]:
        return list(self._live)

    async def close(self) -> None:
        self.closed = True


async def _no_send(frame: str) -> None:
    pass


class Relay:
    """The scheduler driver's ``HostRequester``: hands scale-outs to ``target`` once a test
    sets it (the gateway does this for its auto-scaler)."""

    def __init__(self) -> None:
        self.target: Autoscaler | None = None

    def request_hosts(self, action: ScaleOut) -> None:
        if self.target is not None:
            self.target.request(action)

    def release_hosts(self, action: ScaleIn) -> None:
        if self.target is not None:
            self.target.release(action)


class Env:
    """An autoscaler over a real registry and scheduler; hosts arrive through :meth:`arrive`."""

    def __init__(self, config: ScalingConfig, interval: float = 0.01) -> None:
        self.metrics = GatewayMetrics()
        self.relay = Relay()
        self.scheduling = SchedulerDriver(
            {},
            self.metrics,
            max_subscription_ratio=7.0,
            replicas_per_kernel=config.replicas_per_kernel,
            hosts=self.relay,
        )
        self.hosts = HostRegistry(lost_timeout=30)
        self.provider = FakeProvider()
        self.autoscaler = Autoscaler(
            self.provider,
            self.scheduling,
            self.hosts,
            self.metrics,
            config,
            interval,
            startup_grace=0,
        )
        self.sessions: dict[str, HostSession] = {}

    def arrive(self, name: str, gpus: int = 1) -> None:
        """A host says hello: the host endpoint registers it, the manager tells the
        auto-scaler and the scheduler (``KernelManager.on_host_hello``)."""
        resources = HostResources(
            cpus=8,
            memory_mb=16384,
            gpus=[
                GpuInfo(index=i, uuid=f"GPU-{name}-{i}", name="virt", memory_mb=8192, virtual=True)
                for i in range(gpus)
            ],
        )
        session = HostSession(name, _no_send)
        self.sessions[name] = session
        entry = self.hosts.register(
            Hello(name=name, address="10.0.0.1", resources=resources), session, time.monotonic()
        )
        self.autoscaler.host_registered(name)
        spec, devices = host_spec(entry.resources)
        self.scheduling.handle(HostAdded(name, spec, devices))

    def reserve(self, kernel_id: str, gpus: int) -> None:
        """Commit ``gpus`` GPUs for a kernel's life (reservation binds at placement)."""
        placed = self.scheduling.place_kernel(
            kernel_id, Resources(gpus=gpus, millicpus=100), 1, "reservation"
        )
        assert isinstance(placed, Placement), placed

    def place(self, kernel_id: str, replicas: int = 1) -> list[str]:
        """Place a kernel without GPUs; returns its replicas' hosts."""
        place = self.scheduling.place_kernel(
            kernel_id, Resources(millicpus=100), replicas, "notebookos"
        )
        assert isinstance(place, Placement), place
        return [host for _, host in place.replicas]

    def scale_events(self, direction: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "nbcluster_scale_events_total", {"direction": direction, "outcome": outcome}
        )
        return 0.0 if value is None else value

    def host_names(self) -> tuple[set[str], set[str]]:
        """The hosts the scheduler knows and the hosts the registry knows."""
        return set(self.scheduling.host_views()), set(self.hosts.hosts)


def config(**overrides: Any) -> ScalingConfig:
    fields: dict[str, Any] = {
        "min_hosts": 1,
        "max_hosts": 3,
        "buffer_hosts": 0,
        "gpus_per_host": 1,
        "replicas_per_kernel": 3,
    }
    return ScalingConfig(**{**fields, **overrides})


async def until(condition: Any, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("condition not met in time")


# -- the periodic round: scale-out ---------------------------------------------------------------


async def test_a_round_with_spare_capacity_does_nothing() -> None:
    env = Env(config())
    env.arrive("manual", gpus=2)
    env.reserve("k1", 1)  # 1 * 1.10 <= 2
    assert await env.autoscaler.round() is None
    assert env.provider.starts == []
    assert env.scale_events("out", "ok") == 0


async def test_committed_gpus_times_the_factor_above_capacity_scale_out_once() -> None:
    env = Env(config(max_hosts=3))
    env.arrive("manual", gpus=1)
    env.reserve("k1", 1)  # 1 * 1.10 > 1
    decision = await env.autoscaler.round()
    assert isinstance(decision, ScaleOut) and decision.count == 1
    assert env.provider.starts == [1]
    assert env.scale_events("out", "ok") == 1
    # the host being started counts as present: the next round does not start another
    assert await env.autoscaler.round() is None
    assert env.provider.starts == [1]
    env.arrive("auto-1")
    assert await env.autoscaler.round() is None
    assert env.provider.starts == [1]
    assert env.host_names()[0] == {"manual", "auto-1"}


async def test_scale_out_stops_at_max_hosts() -> None:
    env = Env(config(max_hosts=2))
    env.arrive("manual", gpus=3)
    env.reserve("k1", 3)  # would want ceil(3.3) = 4 one-GPU hosts
    decision = await env.autoscaler.round()
    assert isinstance(decision, ScaleOut) and decision.count == 1
    assert env.provider.starts == [1]
    env.arrive("auto-1")
    assert await env.autoscaler.round() is None  # 2 hosts: the maximum
    assert env.provider.starts == [1]


async def test_an_empty_cluster_grows_to_min_hosts() -> None:
    env = Env(config(min_hosts=2, max_hosts=4))
    decision = await env.autoscaler.round()
    assert isinstance(decision, ScaleOut) and decision.count == 2
    assert env.provider.starts == [2]
    assert await env.autoscaler.round() is None
    assert env.provider.starts == [2]


async def test_a_failed_scale_out_is_counted_and_retried_next_round() -> None:
    env = Env(config())
    env.arrive("manual", gpus=1)
    env.reserve("k1", 1)
    env.provider.start_error = HostProviderError("no quota left")
    assert isinstance(await env.autoscaler.round(), ScaleOut)
    assert env.scale_events("out", "failed") == 1
    assert env.scale_events("out", "ok") == 0
    # nothing is starting: a reactive waiter is not kept waiting
    assert await asyncio.wait_for(env.autoscaler.wait_for_hosts(5), 1) is False
    env.provider.start_error = None
    assert isinstance(await env.autoscaler.round(), ScaleOut)
    assert env.provider.starts == [1, 1]
    assert env.scale_events("out", "ok") == 1


# -- reactive scale-out -------------------------------------------------------------------------


async def test_a_request_starts_hosts_up_to_max_hosts() -> None:
    env = Env(config(max_hosts=3))
    env.arrive("manual")
    env.autoscaler.request(ScaleOut(5, "a kernel found no room"))
    await until(lambda: env.provider.starts)
    assert env.provider.starts == [2]  # 1 present + 2 = 3
    assert env.scale_events("out", "ok") == 2
    # both are starting: another request has no room left
    env.autoscaler.request(ScaleOut(1, "a cell waits for 1 GPU"))
    await asyncio.sleep(0.05)
    assert env.provider.starts == [2]


async def test_wait_for_hosts_is_false_at_once_when_nothing_was_started() -> None:
    env = Env(config())
    started = time.monotonic()
    assert await asyncio.wait_for(env.autoscaler.wait_for_hosts(10), 2) is False
    assert time.monotonic() - started < 1


async def test_wait_for_hosts_is_true_once_a_started_host_registers() -> None:
    env = Env(config())
    env.autoscaler.request(ScaleOut(1, "a kernel found no room"))
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, env.arrive, "auto-1")
    assert await asyncio.wait_for(env.autoscaler.wait_for_hosts(5), 2) is True
    assert env.provider.starts == [1]
    assert env.scheduling.host_view("auto-1") is not None


async def test_wait_for_hosts_gives_up_after_its_timeout() -> None:
    env = Env(config())
    env.autoscaler.request(ScaleOut(1, "a kernel found no room"))
    started = time.monotonic()
    assert await asyncio.wait_for(env.autoscaler.wait_for_hosts(0.2), 2) is False
    assert 0.15 <= time.monotonic() - started < 1.5
    assert env.provider.starts == [1]


async def test_every_waiter_hears_of_a_host_that_arrived() -> None:
    env = Env(config(max_hosts=1))
    env.autoscaler.request(ScaleOut(1, "kernel 1 found no room"))
    env.autoscaler.request(ScaleOut(1, "kernel 2 found no room"))
    asyncio.get_running_loop().call_later(0.05, env.arrive, "auto-1")
    results = await asyncio.wait_for(
        asyncio.gather(env.autoscaler.wait_for_hosts(2), env.autoscaler.wait_for_hosts(2)), 5
    )
    assert env.provider.starts == [1]
    assert list(results) == [True, True]


async def test_a_kernel_rejected_for_lack_of_hosts_is_placed_after_reactive_scale_out() -> None:
    # KernelManager._place, with the scheduler driver's ScaleOut going to the auto-scaler
    env = Env(config(min_hosts=0, max_hosts=5))
    env.relay.target = env.autoscaler
    request = Resources(gpus=1, millicpus=100)
    refused = env.scheduling.place_kernel("k1", request, 3, "notebookos")
    assert isinstance(refused, Refusal) and refused.scaling
    await until(lambda: env.provider.starts)
    assert env.provider.starts == [3]
    for name in env.provider.started():
        env.arrive(name)
    assert await asyncio.wait_for(env.autoscaler.wait_for_hosts(5), 2) is True
    place = env.scheduling.place_kernel("k1", request, 3, "notebookos")
    assert isinstance(place, Placement), place
    assert sorted(host for _, host in place.replicas) == ["auto-1", "auto-2", "auto-3"]


# -- scale-in -----------------------------------------------------------------------------------


async def test_scale_in_stops_only_idle_hosts_the_provider_started() -> None:
    # min 1 with 3 replicas per kernel: up to min_hosts + replicas_per_kernel = 4 hosts stay
    env = Env(config(min_hosts=1, max_hosts=8))
    assert await env.provider.start_hosts(4) == ["auto-1", "auto-2", "auto-3", "auto-4"]
    env.arrive("auto-4")
    assert env.place("k1") == ["auto-4"]  # auto-4 has a replica
    for name in ("a-manual", "auto-1", "auto-2", "auto-3", "b-manual"):
        env.arrive(name)
    assert isinstance(await env.autoscaler.round(), ScaleIn)
    stopped = set(env.provider.stops)
    # a-manual and b-manual were started by hand, auto-4 has a replica: they all stay
    assert stopped and stopped <= {"auto-1", "auto-2", "auto-3"}
    assert len(env.provider.stops) == len(stopped)
    everyone = {"a-manual", "auto-1", "auto-2", "auto-3", "auto-4", "b-manual"}
    in_scheduler, in_registry = env.host_names()
    assert in_scheduler == in_registry == everyone - stopped
    assert all(env.sessions[name].closed for name in stopped)  # forgotten, not left connected
    assert not env.sessions["a-manual"].closed
    assert env.scale_events("in", "ok") == len(stopped)


async def test_scale_in_never_goes_below_min_hosts() -> None:
    env = Env(config(min_hosts=3, max_hosts=8))
    for name in await env.provider.start_hosts(5):
        env.arrive(name)
    assert isinstance(await env.autoscaler.round(), ScaleIn)
    assert env.provider.stops == ["auto-1", "auto-2"]  # 2 per round at most
    assert await env.autoscaler.round() is None
    assert await env.autoscaler.round() is None
    assert env.provider.stops == ["auto-1", "auto-2"]
    in_scheduler, in_registry = env.host_names()
    assert in_scheduler == in_registry == {"auto-3", "auto-4", "auto-5"}
    assert env.scheduling.summary().hosts == 3
    assert env.scale_events("in", "ok") == 2


async def test_scale_in_spares_hosts_that_got_replicas_after_the_decision() -> None:
    env = Env(config(min_hosts=1, max_hosts=8))
    for name in await env.provider.start_hosts(6):
        env.arrive(name)
    # a reactive scale-out holds the lock while its host is launched ...
    env.provider.hold = asyncio.Event()
    env.autoscaler.request(ScaleOut(1, "a cell waits for 1 GPU"))
    await until(lambda: env.provider.starts == [6, 1])
    # ... while a round decides to stop auto-1 and auto-2 and waits for the lock ...
    round_task = asyncio.create_task(env.autoscaler.round())
    await asyncio.sleep(0.02)
    assert not round_task.done()
    # ... and a kernel is placed on them meanwhile
    assert env.place("k1", replicas=3) == ["auto-1", "auto-2", "auto-3"]
    env.provider.hold.set()
    decision = await asyncio.wait_for(round_task, 2)
    assert isinstance(decision, ScaleIn) and decision.hosts == ("auto-1", "auto-2")
    assert env.provider.stops == []
    assert {"auto-1", "auto-2"} <= env.host_names()[0]
    assert env.scale_events("in", "ok") == 0


async def test_a_failed_stop_is_counted_and_the_host_is_not_forgotten() -> None:
    env = Env(config(min_hosts=3, max_hosts=8))
    for name in await env.provider.start_hosts(4):
        env.arrive(name)
    env.provider.stop_errors.add("auto-1")
    assert isinstance(await env.autoscaler.round(), ScaleIn)
    assert env.provider.stops == ["auto-1"]
    assert env.scale_events("in", "failed") == 1
    assert env.scale_events("in", "ok") == 0
    assert "auto-1" in env.hosts.hosts  # still running: not dropped as if stopped
    assert not env.sessions["auto-1"].closed


async def test_hosts_started_by_hand_do_not_block_scale_in_of_owned_ones() -> None:
    env = Env(config(min_hosts=1, max_hosts=8))  # keeps up to 4 hosts
    for name in await env.provider.start_hosts(4):
        env.arrive(name)
    env.arrive("a-manual")  # 5 hosts: one too many, and auto-1..4 are idle
    for _ in range(3):
        await env.autoscaler.round()
    assert env.scheduling.summary().hosts == 4
    assert env.provider.stops == ["auto-1"]


# -- lifetime -----------------------------------------------------------------------------------


async def test_run_keeps_scaling_after_a_failing_round() -> None:
    env = Env(config(min_hosts=1, max_hosts=3), interval=0.01)
    env.provider.start_error = RuntimeError("provider bug")
    task = asyncio.create_task(env.autoscaler.run())
    try:
        await until(lambda: len(env.provider.starts) >= 2)  # the error did not end the loop
        env.provider.start_error = None
        await until(lambda: env.scale_events("out", "ok") >= 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    assert env.provider.started() == ["auto-1"]


async def test_close_cancels_pending_scale_outs_and_closes_the_provider() -> None:
    env = Env(config())
    env.provider.hold = asyncio.Event()
    env.autoscaler.request(ScaleOut(1, "a kernel found no room"))
    await until(lambda: env.provider.starts == [1])
    await asyncio.wait_for(env.autoscaler.close(), 2)
    assert env.provider.closed
    await asyncio.sleep(0.01)
    env.provider.hold.set()
    await asyncio.sleep(0.01)
    assert env.provider.started() == []  # the cancelled launch never completed
    assert env.scale_events("out", "ok") == 0


async def test_a_released_idle_host_is_stopped_and_a_busy_one_kept() -> None:
    # The scheduler driver's ScaleIn, through the gateway (``Gateway.release_hosts``).
    env = Env(config(min_hosts=0, max_hosts=8))
    for name in await env.provider.start_hosts(2):
        env.arrive(name)
    assert env.place("k1") == ["auto-1"]
    env.autoscaler.release(ScaleIn(("auto-1", "auto-2"), "idle"))
    await until(lambda: env.provider.stops == ["auto-2"])
    assert env.host_names() == ({"auto-1"}, {"auto-1"})
    assert env.scale_events("in", "ok") == 1
