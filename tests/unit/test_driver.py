"""The scheduler driver's interpreter: every action type of ``nbcluster.scheduling`` is carried
out (the list is read from the package, not typed here), an unknown one raises, and the
requests that have an answer return it as a value."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import nbcluster.scheduling as scheduling
from nbcluster.gateway._driver import (
    Answers,
    EvictionResult,
    MigrationResult,
    Placement,
    Refusal,
    SchedulerDriver,
)
from nbcluster.gateway._hosts import HostRegistry
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.scheduling import (
    GIB,
    BindGpus,
    BindJobGpus,
    CancelWait,
    DeviceMemoryReported,
    Evict,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    JobGpusRefused,
    JobGpusRequested,
    KernelRequested,
    Migrate,
    MigrationRefused,
    MigrationRequested,
    PlaceReplicas,
    RefuseCell,
    RejectKernel,
    ReleaseGpus,
    ReplicaRequested,
    Resources,
    ScaleIn,
    ScaleOut,
    WaitForGpus,
)


def action_types() -> list[type]:
    """Every action type the package defines, checked against the ``Action`` union."""
    union = set(typing.get_args(scheduling.Action))
    defined = {
        obj
        for name in scheduling.__all__
        if isinstance(obj := getattr(scheduling, name), type)
        and obj.__module__ == "nbcluster.scheduling._actions"
    }
    assert defined == union, f"defined but not in Action: {defined - union}; {union - defined}"
    return sorted(union, key=lambda t: t.__name__)


@dataclass
class FakeCell:
    """A kernel as the driver sees it (``CellRunner``); records what it is told."""

    dispatched: list[tuple[int, str, tuple[int, ...] | None]] = field(default_factory=list)
    shown: list[tuple[int, str]] = field(default_factory=list)
    started: list[tuple[int, str]] = field(default_factory=list)
    cancelled: list[tuple[int, str, str]] = field(default_factory=list)

    def dispatch(self, term: int, replica_id: str, devices: tuple[int, ...] | None) -> bool:
        self.dispatched.append((term, replica_id, devices))
        return True

    def show_waiting(self, term: int, text: str) -> None:
        self.shown.append((term, text))

    def cell_started_after_wait(self, term: int, text: str) -> None:
        self.started.append((term, text))

    def cancel_waiting(self, term: int, ename: str, reason: str) -> None:
        self.cancelled.append((term, ename, reason))


class FakeMover:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.moved: list[Migrate] = []

    async def move_replica(self, migrate: Migrate) -> bool:
        self.moved.append(migrate)
        await asyncio.sleep(0)
        return self.ok


class FakeHosts:
    def __init__(self) -> None:
        self.asked: list[ScaleOut] = []
        self.released: list[ScaleIn] = []

    def request_hosts(self, action: ScaleOut) -> None:
        self.asked.append(action)

    def release_hosts(self, action: ScaleIn) -> None:
        self.released.append(action)


class FakeEvictor:
    """Answers every eviction with ``result`` (or raises ``error``); records the requests."""

    def __init__(self) -> None:
        self.result = EvictionResult(True, freed_bytes=12 * GIB, moved_objects=3)
        self.error: Exception | None = None
        self.asked: list[tuple[str, str, tuple[int, ...], str]] = []

    async def evict(
        self, kernel_id: str, replica_id: str, devices: tuple[int, ...], reason: str
    ) -> EvictionResult:
        self.asked.append((kernel_id, replica_id, devices, reason))
        if self.error is not None:
            raise self.error
        return self.result


class Env:
    def __init__(self, ok: bool = True) -> None:
        self.cell = FakeCell()
        self.mover = FakeMover(ok)
        self.hosts = FakeHosts()
        self.evictor = FakeEvictor()
        self.metrics = GatewayMetrics()
        self.driver = SchedulerDriver(
            {"k": self.cell},
            self.metrics,
            max_subscription_ratio=7.0,
            replicas_per_kernel=3,
            mover=self.mover,
            hosts=self.hosts,
            evictor=self.evictor,
        )
        self.metrics.watch(HostRegistry(lost_timeout=10.0), list, self.driver)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def migrations(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "nbcluster_migrations_total", {"outcome": outcome}
        )
        return 0.0 if value is None else value


#: One action of each type, and what carrying it out must have done.
EFFECTS: dict[type, tuple[Any, Callable[[Env, Answers], bool]]] = {
    PlaceReplicas: (
        PlaceReplicas("k", (("k-1", "h1"),)),
        lambda env, a: a.placed == PlaceReplicas("k", (("k-1", "h1"),)),
    ),
    RejectKernel: (RejectKernel("k", "too big"), lambda env, a: a.refusal == "too big"),
    BindGpus: (
        BindGpus("k", 3, "k-1", "h1", (0,)),
        lambda env, a: env.cell.dispatched == [(3, "k-1", (0,))],
    ),
    ReleaseGpus: (
        ReleaseGpus("k", 3, "k-1", "h1", (0,)),
        lambda env, a: a == Answers() and not env.cell.dispatched,
    ),
    Migrate: (
        Migrate("k", "k-1", "h1", "h2", "k-2"),
        lambda env, a: [m for m, _ in a.migrations] == [Migrate("k", "k-1", "h1", "h2", "k-2")],
    ),
    MigrationRefused: (
        MigrationRefused("k", "k-1", "no room"),
        lambda env, a: a.refusal == "no room",
    ),
    WaitForGpus: (
        WaitForGpus("k", 3, 1, "no host has 1 idle GPUs"),
        lambda env, a: len(env.cell.shown) == 1 and "Waiting for 1 GPU" in env.cell.shown[0][1],
    ),
    CancelWait: (
        CancelWait("k", 3),
        lambda env, a: [c[:2] for c in env.cell.cancelled] == [(3, "KeyboardInterrupt")],
    ),
    ScaleOut: (ScaleOut(2, "full"), lambda env, a: env.hosts.asked == [ScaleOut(2, "full")]),
    ScaleIn: (
        ScaleIn(("h1",), "idle"),
        lambda env, a: env.hosts.released == [ScaleIn(("h1",), "idle")],
    ),
    BindJobGpus: (
        BindJobGpus("j", "h1", (1,)),
        lambda env, a: a.job == BindJobGpus("j", "h1", (1,)),
    ),
    JobGpusRefused: (JobGpusRefused("j", "taken"), lambda env, a: a.refusal == "taken"),
    Evict: (
        Evict("o", "o-1", "h1", (0,), "kernel k needs GPU 0"),
        lambda env, a: (
            [e for e, _ in a.evictions] == [Evict("o", "o-1", "h1", (0,), "kernel k needs GPU 0")]
        ),
    ),
    RefuseCell: (
        RefuseCell("k", 3, "GPU 0 is still held"),
        lambda env, a: env.cell.cancelled == [(3, "GpuUnavailable", "GPU 0 is still held")],
    ),
}


def test_every_action_type_has_a_sample_here() -> None:
    missing = [t.__name__ for t in action_types() if t not in EFFECTS]
    assert not missing, f"give these actions a sample and an expected effect: {missing}"


@pytest.mark.parametrize("kind", action_types(), ids=lambda t: t.__name__)
async def test_the_driver_carries_out_every_action_type(kind: type) -> None:
    env = Env()
    sample, effect = EFFECTS[kind]
    assert isinstance(sample, kind)
    answers = env.driver.carry_out([sample])
    assert effect(env, answers), answers
    await env.driver.close()


@dataclass(frozen=True)
class Teleport:
    kernel_id: str


@pytest.mark.parametrize("unknown", [Teleport("k"), object(), None])
def test_an_unknown_action_raises_naming_it(unknown: Any) -> None:
    env = Env()
    with pytest.raises(TypeError, match="cannot carry out") as caught:
        env.driver.carry_out([unknown])
    assert repr(unknown) in str(caught.value)


@pytest.mark.parametrize(
    ("event", "method"),
    [
        (KernelRequested("k", Resources()), "place_kernel"),
        (ReplicaRequested("k"), "place_replica"),
        (MigrationRequested("k", "k-1"), "migrate"),
        (JobGpusRequested("j", "h1", (0,)), "reserve_job_gpus"),
    ],
)
def test_handle_refuses_a_request_whose_answer_would_be_lost(event: Any, method: str) -> None:
    with pytest.raises(TypeError, match=f"call {method}"):
        Env().driver.handle(event)


# -- answers as values ---------------------------------------------------------------------------


def one_gpu_hosts(env: Env, *names: str) -> None:
    for name in names:
        env.driver.handle(HostAdded(name, Resources(1, 8000, 16384, 16.0)))


def test_placement_and_refusal_are_returned() -> None:
    env = Env()
    refused = env.driver.place_kernel("k", Resources(gpus=1), 3, "notebookos")
    assert isinstance(refused, Refusal) and refused.scaling
    assert "the cluster has no hosts" in refused.reason
    assert env.hosts.asked == [ScaleOut(3, "the cluster has no hosts")]
    one_gpu_hosts(env, "h1", "h2", "h3")
    placed = env.driver.place_kernel("k", Resources(gpus=1), 3, "notebookos")
    assert isinstance(placed, Placement)
    assert sorted(h for _, h in placed.replicas) == ["h1", "h2", "h3"]
    assert placed.reserved_devices is None
    too_big = env.driver.place_kernel("k2", Resources(gpus=4), 1, "notebookos")
    assert isinstance(too_big, Refusal) and not too_big.scaling
    assert "largest host has 1" in too_big.reason


def test_a_reservation_comes_back_with_its_devices() -> None:
    env = Env()
    one_gpu_hosts(env, "h1")
    placed = env.driver.place_kernel("k", Resources(gpus=1), 1, "reservation")
    assert isinstance(placed, Placement) and placed.reserved_devices == (0,)
    assert env.driver.summary().committed_gpus == 1


async def test_an_operators_migration_runs_once_and_is_counted_once() -> None:
    env = Env()
    one_gpu_hosts(env, "h1", "h2", "h3", "h4")
    placed = env.driver.place_kernel("k", Resources(), 3, "notebookos")
    assert isinstance(placed, Placement)
    replica_id, from_host = placed.replicas[0]
    result = await env.driver.migrate("k", replica_id, "h4")
    assert isinstance(result, MigrationResult) and result.ok
    assert (result.migrate.from_host, result.migrate.to_host) == (from_host, "h4")
    assert env.mover.moved == [result.migrate]
    await asyncio.sleep(0.01)  # nothing else runs it again
    assert env.mover.moved == [result.migrate]
    assert (env.migrations("ok"), env.migrations("failed")) == (1, 0)
    view = env.driver.kernel_view("k")
    assert view is not None and len(view.replicas) == 3
    refused = await env.driver.migrate("k", "nope", None)
    assert isinstance(refused, Refusal) and "has no replica nope" in refused.reason


async def test_a_failed_operators_migration_is_reported_and_counted() -> None:
    env = Env(ok=False)
    one_gpu_hosts(env, "h1", "h2", "h3", "h4")
    placed = env.driver.place_kernel("k", Resources(), 3, "notebookos")
    assert isinstance(placed, Placement)
    result = await env.driver.migrate("k", placed.replicas[0][0], None)
    assert isinstance(result, MigrationResult) and not result.ok
    assert (env.migrations("ok"), env.migrations("failed")) == (0, 1)


def test_a_job_holds_gpus_through_the_driver_and_hands_them_to_a_waiting_cell() -> None:
    env = Env()
    one_gpu_hosts(env, "h1")
    assert env.driver.reserve_job_gpus("j1", "h1", (0,))
    assert not env.driver.reserve_job_gpus("j2", "h1", (0,))  # taken
    view = env.driver.host_view("h1")
    assert view is not None and view.jobs == (("j1", (0,)),) and view.free_devices == []
    placed = env.driver.place_kernel("k", Resources(gpus=1), 1, "batch")
    assert isinstance(placed, Placement)
    env.driver.handle(ExecutionRequested("k", 1))
    assert env.driver.waiting == (("k", 1),)
    assert env.cell.dispatched == []
    env.driver.release_job_gpus("j1")
    assert env.driver.waiting == ()
    assert env.cell.dispatched == [(1, placed.replicas[0][0], (0,))]


# -- evictions ----------------------------------------------------------------------------------


async def evictions_done() -> None:
    """Wait for the driver's eviction tasks (each feeds its answer to the scheduler)."""
    tasks = [t for t in asyncio.all_tasks() if "evict GPU memory" in t.get_name()]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


def other_kernel_leaves_memory(env: Env) -> str:
    """Kernel ``o`` ran a cell on h1's only GPU and left 12 GB there; returns its replica."""
    one_gpu_hosts(env, "h1")
    placed = env.driver.place_kernel("o", Resources(gpus=1, vram_gb=8.0), 1, "batch")
    assert isinstance(placed, Placement)
    replica = placed.replicas[0][0]
    env.driver.handle(ExecutionRequested("o", 1))
    env.driver.handle(DeviceMemoryReported("o", replica, {0: 12 * GIB}))
    env.driver.handle(ExecutionFinished("o", 1))
    return replica


async def test_a_cell_runs_once_another_kernels_memory_is_moved_and_says_so() -> None:
    env = Env()
    other = other_kernel_leaves_memory(env)
    placed = env.driver.place_kernel("k", Resources(gpus=1, vram_gb=8.0), 1, "batch")
    assert isinstance(placed, Placement)
    env.driver.handle(ExecutionRequested("k", 1))
    assert env.cell.dispatched == []  # parked until the eviction is answered
    assert env.driver.parked == (("k", 1),)
    await evictions_done()
    assert env.evictor.asked == [("o", other, (0,), "kernel k needs GPU 0")]
    assert env.cell.dispatched == [(1, placed.replicas[0][0], (0,))]
    [(term, text)] = env.cell.shown
    assert term == 1
    assert text.startswith("[nbcluster] waited ")
    assert text.endswith("s for GPU 0 to be freed by another kernel (12.0 GB moved)\n")
    assert env.sample("nbcluster_evictions_total", {"outcome": "ok"}) == 1
    assert env.sample("nbcluster_evicted_bytes_total") == 12 * GIB
    assert env.sample("nbcluster_eviction_seconds_count") == 1
    [device] = env.driver.device_memory("h1")
    assert device.held == () and device.committed == 8 * GIB
    gauge = env.sample(
        "nbcluster_host_gpu_memory_bytes", {"host": "h1", "device": "0", "state": "committed"}
    )
    assert gauge == 8 * GIB
    await env.driver.close()


@pytest.mark.parametrize("how", ["error", "raises"])
async def test_a_failed_eviction_refuses_the_cell_and_is_counted(how: str) -> None:
    env = Env()
    if how == "error":
        env.evictor.result = EvictionResult(False, error="ControlMessageError: GPU 0 is busy")
    else:
        env.evictor.error = ConnectionError("link closed")
    other_kernel_leaves_memory(env)
    placed = env.driver.place_kernel("k", Resources(gpus=1, vram_gb=8.0), 1, "batch")
    assert isinstance(placed, Placement)
    env.driver.handle(ExecutionRequested("k", 1))
    await evictions_done()
    assert env.cell.dispatched == []
    [(term, ename, reason)] = env.cell.cancelled
    assert (term, ename) == (1, "GpuUnavailable")
    assert "still held by kernel o" in reason
    assert ("GPU 0 is busy" if how == "error" else "link closed") in reason
    assert env.sample("nbcluster_evictions_total", {"outcome": "failed"}) == 1
    assert env.driver.parked == () and env.driver.summary().committed_gpus == 0
    held = env.sample(
        "nbcluster_host_gpu_memory_bytes", {"host": "h1", "device": "0", "state": "held"}
    )
    assert held == 12 * GIB
    await env.driver.close()
