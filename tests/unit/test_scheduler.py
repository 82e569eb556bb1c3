"""The pure scheduler core: accounting invariants under any event order (hypothesis) and the
scenarios of issue 4 (oversubscription, waiting, reservation, migration, draining, scaling)."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nbcluster.scheduling import (
    DEFAULT_REQUEST,
    Action,
    BindGpus,
    CancelWait,
    ClusterSummary,
    Event,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    HostResourcesChanged,
    JobGpusReleased,
    JobGpusRequested,
    KernelAdopted,
    KernelRequested,
    KernelStopped,
    Migrate,
    MigrationRefused,
    MigrationRequested,
    PlaceReplicas,
    RejectKernel,
    ReleaseGpus,
    ReplicaAdopted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleIn,
    ScaleOut,
    ScalingConfig,
    Scheduler,
    SchedulerConfig,
    WaitForGpus,
    parse_request,
    scaling_decision,
)

T = TypeVar("T")

HOST = Resources(gpus=1, millicpus=64_000, memory_mb=128_000, vram_gb=40.0)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)


def cluster(hosts: int, spec: Resources = HOST) -> Scheduler:
    s = Scheduler()
    for i in range(hosts):
        assert s.handle(HostAdded(f"h{i}", spec)) == []
    return s


U = TypeVar("U")


def one(actions: list[Action], kind: type[T]) -> T:
    """The only action, checked to be a ``kind``."""
    assert len(actions) == 1, actions
    assert isinstance(actions[0], kind), actions
    return actions[0]


def two(actions: list[Action], first: type[T], second: type[U]) -> tuple[T, U]:
    assert len(actions) == 2, actions
    a, b = actions
    assert isinstance(a, first) and isinstance(b, second), actions
    return a, b


def of_type(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


# ----------------------------------------------------------------- resources


def test_resources_arithmetic() -> None:
    a = Resources(1, 500, 100, 1.5)
    b = Resources(2, 1500, 900, 0.5)
    assert a + b == Resources(3, 2000, 1000, 2.0)
    assert (a + b) - b == a
    assert a.fits(a + b)
    assert not (a + b).fits(a)
    assert Resources().is_zero()
    assert not a.is_zero()
    assert (Resources(0, 0, 0, 0.1) + Resources(0, 0, 0, 0.2)) - Resources(
        0, 0, 0, 0.3
    ) == Resources()


def test_parse_request() -> None:
    assert parse_request({}) == DEFAULT_REQUEST
    env = {
        "KERNEL_GPUS": "2",
        "KERNEL_CPUS": "0.5",
        "KERNEL_MEMORY_MB": "2048",
        "KERNEL_VRAM_GB": "8",
    }
    assert parse_request(env) == Resources(2, 500, 2048, 8.0)
    assert parse_request({"KERNEL_CPUS": "1.0001"}).millicpus == 1001


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KERNEL_GPUS", "1.5"),
        ("KERNEL_GPUS", "-1"),
        ("KERNEL_GPUS", "many"),
        ("KERNEL_CPUS", "-0.5"),
        ("KERNEL_CPUS", "nan"),
        ("KERNEL_MEMORY_MB", "lots"),
        ("KERNEL_VRAM_GB", "inf"),
    ],
)
def test_parse_request_names_the_bad_field(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        parse_request({name: value})


# ----------------------------------------------------------------- scenarios


def test_a_cell_that_needs_no_gpu_does_not_wait_for_one() -> None:
    """``%%cpu``: a GPU kernel's cell that says it needs no GPU runs at once while every GPU is
    busy, commits none, and a later GPU cell of the same kernel still waits for its GPU."""
    s = cluster(3)
    for k in range(4):
        one(s.handle(KernelRequested(f"k{k}", ONE_GPU)), PlaceReplicas)
    for k in range(3):
        assert of_type(s.handle(ExecutionRequested(f"k{k}", term=1)), BindGpus)
    [bind] = of_type(s.handle(ExecutionRequested("k3", term=1, gpus=0)), BindGpus)
    assert bind.device_indices == () and s.summary().committed_gpus == 3
    assert not s.waiting
    s.handle(ExecutionFinished("k3", 1))
    assert of_type(s.handle(ExecutionRequested("k3", term=2)), WaitForGpus)
    assert list(s.waiting) == [("k3", 2)]


def test_oversubscription_then_waiting_then_binding() -> None:
    """3 hosts x 1 GPU, 6 kernels x 1 GPU: all place, 3 cells bind, the 4th waits."""
    s = cluster(3)
    for k in range(6):
        place = one(s.handle(KernelRequested(f"k{k}", ONE_GPU)), PlaceReplicas)
        assert isinstance(place, PlaceReplicas)
        assert len({host for _, host in place.replicas}) == 3
    assert all(h.pending.gpus == 6 for h in s.hosts.values())
    assert all(h.subscription_ratio == pytest.approx(2.0) for h in s.hosts.values())

    bound: list[BindGpus] = []
    for k in range(3):
        actions = s.handle(ExecutionRequested(f"k{k}", term=1))
        bound += of_type(actions, BindGpus)
    assert len(bound) == 3
    assert sorted(b.host for b in bound) == ["h0", "h1", "h2"]
    assert all(b.device_indices == (0,) for b in bound)

    actions = s.handle(ExecutionRequested("k3", term=1))
    [wait] = of_type(actions, WaitForGpus)
    assert wait.gpus == 1 and "1 idle GPUs" in wait.reason
    assert of_type(actions, ScaleOut)
    assert s.handle(ExecutionRequested("k4", term=1))[0] == WaitForGpus(
        "k4", 1, 1, "no host has 1 idle GPUs"
    )
    assert list(s.waiting) == [("k3", 1), ("k4", 1)]
    assert s.summary().committed_gpus == 3

    freed = bound[1]
    actions = s.handle(ExecutionFinished(freed.kernel_id, 1))
    assert actions[0] == ReleaseGpus(freed.kernel_id, 1, freed.replica_id, freed.host, (0,))
    [rebound] = of_type(actions, BindGpus)
    assert (rebound.kernel_id, rebound.host, rebound.term) == ("k3", freed.host, 1)
    assert list(s.waiting) == [("k4", 1)]

    # Interrupting a waiting cell cancels its wait.
    assert s.handle(ExecutionCancelled("k4", 1)) == [CancelWait("k4", 1)]
    assert list(s.waiting) == []
    for k in range(6):
        s.handle(KernelStopped(f"k{k}"))
    assert all(h.pending.is_zero() and not h.bound for h in s.hosts.values())


def test_previous_executor_is_preferred_then_most_idle() -> None:
    s = cluster(3, Resources(2, 64_000, 128_000, 40))
    place = one(s.handle(KernelRequested("a", ONE_GPU)), PlaceReplicas)
    s.handle(KernelRequested("b", ONE_GPU))
    first = place.replicas[2][0]
    bind = one(s.handle(ExecutionRequested("a", 1, preferred_replica=first)), BindGpus)
    assert bind.replica_id == first
    s.handle(ExecutionFinished("a", 1))
    # b takes one GPU of a's previous host: a goes to a host with 2 idle GPUs instead.
    bind_b = one(s.handle(ExecutionRequested("b", 1, preferred_replica=None)), BindGpus)
    bind_b2 = one(
        s.handle(ExecutionRequested("a", 2, preferred_replica=bind_b.replica_id)), BindGpus
    )
    assert bind_b2.host != bind_b.host or s.hosts[bind_b.host].idle_gpus == 0


def test_reservation_rejects_the_fourth_kernel() -> None:
    s = cluster(3)
    for k in range(3):
        actions = s.handle(KernelRequested(f"k{k}", ONE_GPU, policy="reservation"))
        place, bind = two(actions, PlaceReplicas, BindGpus)
        assert len(place.replicas) == 1 and bind.term is None
    actions = s.handle(KernelRequested("k3", ONE_GPU, policy="reservation"))
    [reject] = of_type(actions, RejectKernel)
    assert "no host has 1 free GPUs" in reject.reason
    assert of_type(actions, ScaleOut)
    # A cell runs with the life-long devices; finishing it releases nothing.
    bind = one(s.handle(ExecutionRequested("k0", 7)), BindGpus)
    assert bind.term == 7 and bind.device_indices == (0,)
    assert s.handle(ExecutionFinished("k0", 7)) == []
    assert s.summary().committed_gpus == 3
    release = one(s.handle(KernelStopped("k0")), ReleaseGpus)
    assert isinstance(release, ReleaseGpus) and release.term is None
    assert s.summary().committed_gpus == 2


def test_batch_binds_per_cell_with_one_replica() -> None:
    s = cluster(2)
    place = one(s.handle(KernelRequested("k", ONE_GPU, policy="batch")), PlaceReplicas)
    assert len(place.replicas) == 1
    assert s.summary().committed_gpus == 0
    bind = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    assert s.summary().committed_gpus == 1
    assert s.handle(ExecutionFinished("k", 1)) == [
        ReleaseGpus("k", 1, bind.replica_id, bind.host, bind.device_indices)
    ]


def test_migrates_when_every_replica_host_is_full() -> None:
    s = cluster(3)
    place = one(s.handle(KernelRequested("busy", ONE_GPU)), PlaceReplicas)
    for k in range(3):
        s.handle(KernelRequested(f"hog{k}", ONE_GPU))
    for k in range(3):
        assert of_type(s.handle(ExecutionRequested(f"hog{k}", 1)), BindGpus)
    s.handle(HostAdded("fresh", HOST))
    actions = s.handle(ExecutionRequested("busy", 1, preferred_replica=place.replicas[0][0]))
    migrate, bind = two(actions, Migrate, BindGpus)
    assert migrate == Migrate(
        "busy", place.replicas[0][0], place.replicas[0][1], "fresh", "busy-r4"
    )
    assert bind == BindGpus("busy", 1, "busy-r4", "fresh", (0,))
    replicas = dict(s.kernels["busy"].replicas)
    assert replicas["busy-r4"] == "fresh" and place.replicas[0][0] not in replicas
    assert (
        s.hosts[place.replicas[0][1]].pending.gpus == 3
    )  # the claim moved (4 kernels placed there before)
    assert s.hosts["fresh"].pending.gpus == 1


def test_waiting_cell_migrates_when_a_host_is_added() -> None:
    s = cluster(3)
    for k in range(4):
        s.handle(KernelRequested(f"k{k}", ONE_GPU))
    for k in range(3):
        s.handle(ExecutionRequested(f"k{k}", 1))
    assert of_type(s.handle(ExecutionRequested("k3", 1)), WaitForGpus)
    migrate, bind = two(s.handle(HostAdded("new", HOST)), Migrate, BindGpus)
    assert migrate.to_host == "new"
    assert (bind.kernel_id, bind.host) == ("k3", "new")


def test_a_replacement_executes_only_once_ready() -> None:
    s = cluster(3)
    place = one(s.handle(KernelRequested("k", Resources(), replicas=2)), PlaceReplicas)
    for rid, _ in place.replicas:
        s.handle(ReplicaStopped("k", rid))
    new = one(s.handle(ReplicaRequested("k")), PlaceReplicas)
    [(rid, host)] = new.replicas
    wait = one(s.handle(ExecutionRequested("k", 1)), WaitForGpus)
    assert wait.reason == "the kernel has no running replica"
    assert one(s.handle(ExecutionRequested("k", 2)), WaitForGpus).behind_own_cell
    bind = one(s.handle(ReplicaReady("k", rid)), BindGpus)
    assert (bind.term, bind.replica_id, bind.host) == (1, rid, host)


def test_a_lone_replica_waits_instead_of_migrating() -> None:
    s = cluster(2)
    one(s.handle(KernelRequested("hog", ONE_GPU, policy="batch")), PlaceReplicas)
    place = one(s.handle(KernelRequested("k", ONE_GPU, policy="batch")), PlaceReplicas)
    s.handle(ExecutionRequested("hog", 1))
    hog_host = s.kernels["hog"].binding.host  # type: ignore[union-attr]
    if place.replicas[0][1] == hog_host:
        wait = one(s.handle(ExecutionRequested("k", 1)), WaitForGpus)
        assert not wait.behind_own_cell


def test_queued_cell_waits_silently_then_says_so_if_the_cluster_is_full() -> None:
    s = cluster(3)
    s.handle(KernelRequested("k", ONE_GPU))
    for k in range(3):
        s.handle(KernelRequested(f"hog{k}", ONE_GPU))
    first = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    for k in range(2):
        one(s.handle(ExecutionRequested(f"hog{k}", 1)), BindGpus)
    waiting = of_type(s.handle(ExecutionRequested("hog2", 1)), WaitForGpus)
    assert waiting and not waiting[0].behind_own_cell
    queued = one(s.handle(ExecutionRequested("k", 2)), WaitForGpus)
    assert queued.behind_own_cell
    actions = s.handle(ExecutionFinished("k", 1))
    assert actions[0] == ReleaseGpus("k", 1, first.replica_id, first.host, (0,))
    # The older waiter (hog2) gets the freed GPU; k's next cell now waits for the cluster.
    assert [(b.kernel_id, b.term) for b in of_type(actions, BindGpus)] == [("hog2", 1)]
    assert of_type(actions, WaitForGpus) == [
        WaitForGpus("k", 2, 1, "no host has 1 idle GPUs", behind_own_cell=False)
    ]


def test_manual_migration() -> None:
    s = cluster(4)
    place = one(s.handle(KernelRequested("k", ONE_GPU)), PlaceReplicas)
    used = {h for _, h in place.replicas}
    [free] = {"h0", "h1", "h2", "h3"} - used
    rid, source = place.replicas[0]
    migrate = one(s.handle(MigrationRequested("k", rid)), Migrate)
    assert (migrate.from_host, migrate.to_host) == (source, free)
    replicas = dict(s.kernels["k"].replicas)
    assert rid not in replicas and replicas[migrate.new_replica_id] == free
    assert s.hosts[source].pending.gpus == 0 and s.hosts[free].pending.gpus == 1
    # Refusals name the reason.
    other = place.replicas[1][0]
    refused = one(s.handle(MigrationRequested("k", other, to_host=free)), MigrationRefused)
    assert "already runs a replica" in refused.reason
    refused = one(s.handle(MigrationRequested("k", other, to_host="nowhere")), MigrationRefused)
    assert "no host named nowhere" in refused.reason
    refused = one(s.handle(MigrationRequested("k", "k-r99")), MigrationRefused)
    assert "has no replica k-r99" in refused.reason
    bind = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    refused = one(s.handle(MigrationRequested("k", bind.replica_id)), MigrationRefused)
    assert "is executing a cell" in refused.reason
    # The moved-away host can take the replica back (a failed migration re-adopts the old one).
    assert s.handle(ReplicaStopped("k", migrate.new_replica_id)) == []
    assert s.handle(ReplicaAdopted("k", rid, source, ONE_GPU)) == []
    assert dict(s.kernels["k"].replicas)[rid] == source


def test_adoption_after_a_gateway_restart() -> None:
    s = cluster(2)
    assert s.handle(ReplicaAdopted("k", "k-a", "h0", ONE_GPU, "reservation", (0,))) == []
    assert s.handle(ReplicaAdopted("k", "k-b", "unknown", ONE_GPU)) == []
    view = s.kernels["k"]
    assert view.policy == "reservation" and dict(view.replicas) == {"k-a": "h0"}
    assert view.binding is not None and view.binding.device_indices == (0,)
    assert s.hosts["h0"].committed_gpus == 1
    # The life-long binding is what the next cell runs with.
    bind = one(s.handle(ExecutionRequested("k", 7)), BindGpus)
    assert (bind.replica_id, bind.device_indices) == ("k-a", (0,))
    # A restored kernel's cells wait until one of its replicas is adopted.
    assert s.handle(KernelAdopted("z", Resources())) == []
    assert s.has_kernel("z")
    wait = one(s.handle(ExecutionRequested("z", 1)), WaitForGpus)
    assert wait.reason == "the kernel has no running replica" and not wait.behind_own_cell
    bind = one(s.handle(ReplicaAdopted("z", "z-a", "h1", Resources())), BindGpus)
    assert (bind.term, bind.replica_id) == (1, "z-a")
    # New replica ids come from the configured namer and never repeat an existing one.
    named = Scheduler(SchedulerConfig(new_replica_id=lambda k, n: f"{k[:2]}-{n % 2}"))
    named.handle(HostAdded("h0", HOST))
    named.handle(HostAdded("h1", HOST))
    place = one(named.handle(KernelRequested("kernel", ONE_GPU, replicas=2)), PlaceReplicas)
    assert sorted(r for r, _ in place.replicas) == ["ke-0", "ke-1"]


def test_over_large_request_is_rejected_with_the_numbers() -> None:
    s = cluster(2, Resources(8, 64_000, 128_000, 40))
    reject = one(s.handle(KernelRequested("k", Resources(gpus=9))), RejectKernel)
    assert reject == RejectKernel("k", "requests 9 GPUs; the largest host has 8")
    reject = one(s.handle(KernelRequested("m", Resources(millicpus=100_000))), RejectKernel)
    assert isinstance(reject, RejectKernel) and "100000 millicpus" in reject.reason
    assert "k" not in s.kernels


def test_too_few_hosts_rejects_and_scales_out() -> None:
    s = cluster(2)
    reject, scale = two(s.handle(KernelRequested("k", ONE_GPU)), RejectKernel, ScaleOut)
    assert "3 replicas need 3 hosts" in reject.reason
    assert scale == ScaleOut(1, reject.reason)
    assert of_type(Scheduler().handle(KernelRequested("k", ONE_GPU)), RejectKernel)


def test_subscription_cap() -> None:
    s = Scheduler(SchedulerConfig(max_subscription_ratio=1.0))
    for i in range(3):
        s.handle(HostAdded(f"h{i}", HOST))
    for k in range(3):  # 3 kernels x 3 replicas / 3 hosts = 3 pending per 1-GPU host: ratio 1
        assert of_type(s.handle(KernelRequested(f"k{k}", ONE_GPU)), PlaceReplicas)
    assert of_type(s.handle(KernelRequested("k3", ONE_GPU)), RejectKernel)


def test_gpu_less_hosts_take_only_gpu_less_kernels() -> None:
    s = cluster(3, Resources(0, 64_000, 128_000, 0))
    assert of_type(s.handle(KernelRequested("cpu", DEFAULT_REQUEST)), PlaceReplicas)
    assert s.handle(KernelRequested("gpu", ONE_GPU)) == [
        RejectKernel("gpu", "requests 1 GPUs; the largest host has 0")
    ]
    # 0-GPU kernels never wait, even when many cells arrive at once.
    bind = one(s.handle(ExecutionRequested("cpu", 1)), BindGpus)
    assert bind.device_indices == ()
    assert of_type(s.handle(ExecutionRequested("cpu", 2)), BindGpus)


def test_shrinking_host_drains() -> None:
    s = Scheduler()
    s.handle(HostAdded("big", Resources(2, 64_000, 128_000, 40), (0, 1)))
    s.handle(HostAdded("h1", HOST))
    s.handle(HostAdded("h2", HOST))
    s.handle(KernelRequested("k", Resources(gpus=1)))
    bind = one(s.handle(ExecutionRequested("k", 1, preferred_replica="k-r1")), BindGpus)
    assert bind.host == "big"  # most idle GPUs
    # The host loses the device the cell holds: drained, not crashed.
    assert s.handle(HostResourcesChanged("big", Resources(1, 64_000, 128_000, 40), (1,))) == []
    big = s.hosts["big"]
    assert big.draining and big.committed_gpus == 1
    assert of_type(s.handle(KernelRequested("j", Resources(gpus=1))), RejectKernel)
    s.handle(ExecutionFinished("k", 1))
    assert not s.hosts["big"].draining
    assert of_type(s.handle(KernelRequested("j", Resources(gpus=1))), PlaceReplicas)


def test_replica_stop_and_replace() -> None:
    s = cluster(4)
    place = one(s.handle(KernelRequested("k", ONE_GPU)), PlaceReplicas)
    bind = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    s.handle(ExecutionRequested("k", 2))  # queued behind cell 1
    # The executor dies: cell 1 runs again on another replica, before cell 2.
    release, rebind = two(s.handle(ReplicaStopped("k", bind.replica_id)), ReleaseGpus, BindGpus)
    assert release.device_indices == bind.device_indices
    assert rebind.term == 1 and rebind.replica_id != bind.replica_id
    assert s.kernels["k"].waiting == (2,)
    placed = one(s.handle(ReplicaRequested("k")), PlaceReplicas)
    assert isinstance(placed, PlaceReplicas)
    [(_, host)] = placed.replicas
    assert host not in {h for r, h in place.replicas if r != bind.replica_id}
    assert len(s.kernels["k"].replicas) == 3
    assert of_type(s.handle(ExecutionFinished("k", 1)), BindGpus)[0].term == 2
    # Without rerun (a failed migration) the cell is the caller's to ask for again.
    bound = s.kernels["k"].binding
    assert bound is not None
    one(s.handle(ReplicaStopped("k", bound.replica_id, rerun=False)), ReleaseGpus)
    assert s.kernels["k"].waiting == () and s.kernels["k"].binding is None


def test_host_with_wrong_device_count_is_refused() -> None:
    with pytest.raises(ValueError, match="2 distinct device indices"):
        Scheduler().handle(HostAdded("h", Resources(gpus=2), (0, 0)))


def test_host_removed_forgets_its_replicas_and_bindings() -> None:
    s = cluster(3)
    s.handle(KernelRequested("k", ONE_GPU))
    bind = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    release = one(s.handle(HostRemoved(bind.host)), ReleaseGpus)
    assert isinstance(release, ReleaseGpus)
    assert len(s.kernels["k"].replicas) == 2
    assert s.kernels["k"].binding is None


# ----------------------------------------------------------------- scaling


def summary(hosts: int, committed: int, idle: int = 0, gpus_per_host: int = 8) -> ClusterSummary:
    return ClusterSummary(
        hosts=hosts,
        gpu_capacity=hosts * gpus_per_host,
        committed_gpus=committed,
        pending_gpus=committed,
        waiting_cells=0,
        idle_hosts=tuple(f"h{i}" for i in range(idle)),
    )


def test_scaling_decisions() -> None:
    config = ScalingConfig()  # min 12 + buffer 3, max 32, 8 GPUs per host
    assert scaling_decision(summary(15, 0), config) is None
    out = scaling_decision(summary(10, 0), config)
    assert isinstance(out, ScaleOut) and out.count == 5
    # 120 committed x 1.10 = 132 > 120 GPUs: 17 hosts.
    out = scaling_decision(summary(15, 120), config)
    assert isinstance(out, ScaleOut) and out.count == math.ceil(132 / 8) - 15
    # never past max
    out = scaling_decision(summary(30, 240), config)
    assert isinstance(out, ScaleOut) and out.count == 2
    # 20 hosts, 8 committed: limit is the floor (15): release idle hosts, 2 per round.
    into = scaling_decision(summary(20, 8, idle=5), config)
    assert into == ScaleIn(("h0", "h1"), into.reason if into else "")
    assert scaling_decision(summary(16, 8, idle=5), config) == ScaleIn(
        ("h0",), "16 hosts exceed the 15 that 8 committed GPUs * 1.15 need"
    )
    assert scaling_decision(summary(20, 8, idle=0), config) is None  # nothing idle
    # When min < replicas_per_kernel the floor is min + replicas_per_kernel (NotebookOS).
    small = ScalingConfig(min_hosts=1, max_hosts=8, buffer_hosts=0)
    assert scaling_decision(summary(4, 0, idle=4), small) is None
    assert scaling_decision(summary(5, 0, idle=5), small) == ScaleIn(
        ("h0",), "5 hosts exceed the 4 that 0 committed GPUs * 1.15 need"
    )
    with pytest.raises(ValueError):
        ScalingConfig(min_hosts=5, max_hosts=2)


# ----------------------------------------------------------------- invariants

HOSTS = [f"h{i}" for i in range(5)]
KERNELS = [f"k{i}" for i in range(6)]
JOBS = [f"j{i}" for i in range(3)]


def check_accounting(s: Scheduler, shrunk: set[str]) -> None:
    """Claims and bindings agree on both sides; caps hold (except on hosts that shrank)."""
    hosts = s.hosts
    kernels = s.kernels
    for host in hosts.values():
        used = [d for _, devices in (*host.bound, *host.jobs) for d in devices]
        assert len(used) == len(set(used)), "a GPU device is bound twice"
        if not host.draining:
            assert host.committed_gpus <= host.spec.gpus
            assert set(used) <= set(host.gpu_devices)
        if host.name not in shrunk:
            assert host.subscription_ratio <= s.config.max_subscription_ratio + 1e-9
        expected = Resources()
        for kernel_id, replica_id in host.replicas:
            assert dict(kernels[kernel_id].replicas)[replica_id] == host.name
            expected = expected + kernels[kernel_id].request
        for _, devices in host.jobs:
            expected = expected + Resources(gpus=len(devices))
        assert host.pending == expected
        for kernel_id, devices in host.bound:
            binding = kernels[kernel_id].binding
            assert binding is not None and binding.host == host.name
            assert binding.device_indices == devices
    for kernel in kernels.values():
        for replica_id, host_name in kernel.replicas:
            assert (kernel.kernel_id, replica_id) in hosts[host_name].replicas
        if not any(r.endswith("-adopted") for r, _ in kernel.replicas):
            # Placement spreads replicas; adoption records what runs, wherever it runs.
            assert len({h for _, h in kernel.replicas}) == len(kernel.replicas)
        if kernel.binding is not None:
            assert kernel.binding.replica_id in dict(kernel.replicas)
    queued = Counter(k for k, _ in s.waiting)
    assert all(queued[k.kernel_id] == len(k.waiting) for k in kernels.values())


class SchedulerMachine(RuleBasedStateMachine):
    """Random event sequences; the accounting must stay sound and leak nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(SchedulerConfig(max_subscription_ratio=2.0))
        self.term = 0
        self.shrunk: set[str] = set()
        self.terms: dict[str, list[int]] = {}

    def apply(self, event: Event) -> list[Action]:
        actions = self.s.handle(event)
        for a in actions:
            if isinstance(a, RejectKernel):
                assert a.reason
        return actions

    @rule(name=st.sampled_from(HOSTS), gpus=st.integers(0, 3), cpus=st.integers(1, 8))
    def add_host(self, name: str, gpus: int, cpus: int) -> None:
        known = name in self.s.hosts
        self.apply(HostAdded(name, Resources(gpus, cpus * 1000, 8192, 16.0 * gpus)))
        if known:
            self.shrunk.add(name)

    @rule(name=st.sampled_from(HOSTS))
    def remove_host(self, name: str) -> None:
        self.apply(HostRemoved(name))
        self.shrunk.discard(name)

    @rule(name=st.sampled_from(HOSTS), gpus=st.integers(0, 3), offset=st.integers(0, 2))
    def change_host(self, name: str, gpus: int, offset: int) -> None:
        devices = tuple(range(offset, offset + gpus))
        self.apply(HostResourcesChanged(name, Resources(gpus, 4000, 8192, 8.0 * gpus), devices))
        self.shrunk.add(name)

    @rule(
        kernel=st.sampled_from(KERNELS),
        gpus=st.integers(0, 3),
        policy=st.sampled_from(["notebookos", "reservation", "batch"]),
        replicas=st.sampled_from([None, 1, 2]),
    )
    def request_kernel(self, kernel: str, gpus: int, policy: str, replicas: int | None) -> None:
        request = Resources(gpus, 500, 1024, 2.0 * gpus)
        self.apply(KernelRequested(kernel, request, replicas, policy))

    @rule(kernel=st.sampled_from(KERNELS))
    def request_replica(self, kernel: str) -> None:
        self.apply(ReplicaRequested(kernel))

    @rule(kernel=st.sampled_from(KERNELS), index=st.integers(0, 3))
    def replica_ready(self, kernel: str, index: int) -> None:
        view = self.s.kernels.get(kernel)
        if view and view.replicas:
            self.apply(ReplicaReady(kernel, view.replicas[index % len(view.replicas)][0]))

    @rule(kernel=st.sampled_from(KERNELS), index=st.integers(0, 2))
    def stop_replica(self, kernel: str, index: int) -> None:
        view = self.s.kernels.get(kernel)
        if view and view.replicas:
            self.apply(ReplicaStopped(kernel, view.replicas[index % len(view.replicas)][0]))

    @rule(
        kernel=st.sampled_from(KERNELS),
        prefer=st.integers(0, 3),
        cpu_only=st.sampled_from([False, False, True]),
    )
    def execute(self, kernel: str, prefer: int, cpu_only: bool) -> None:
        self.term += 1
        view = self.s.kernels.get(kernel)
        preferred = None
        if view and prefer < len(view.replicas):
            preferred = view.replicas[prefer][0]
        self.terms.setdefault(kernel, []).append(self.term)
        # ``cpu_only``: a ``%%cpu`` cell, which asks for no GPU whatever the kernel's request.
        actions = self.apply(
            ExecutionRequested(kernel, self.term, preferred, gpus=0 if cpu_only else None)
        )
        # (Under ``reservation`` the kernel's GPUs are its own for its life: %%cpu changes
        # nothing there.)
        if cpu_only and view is not None and view.policy != "reservation":
            for bind in (a for a in actions if isinstance(a, BindGpus)):
                if bind.term == self.term:
                    assert bind.device_indices == (), "a %%cpu cell was given GPUs"

    @rule(kernel=st.sampled_from(KERNELS), which=st.integers(0, 3), cancel=st.booleans())
    def finish(self, kernel: str, which: int, cancel: bool) -> None:
        terms = self.terms.get(kernel)
        if terms:
            term = terms[which % len(terms)]
            self.apply((ExecutionCancelled if cancel else ExecutionFinished)(kernel, term))

    @rule(
        kernel=st.sampled_from(KERNELS),
        index=st.integers(0, 2),
        to=st.sampled_from([None, *HOSTS]),
    )
    def migrate(self, kernel: str, index: int, to: str | None) -> None:
        view = self.s.kernels.get(kernel)
        if view and view.replicas:
            replica = view.replicas[index % len(view.replicas)][0]
            for a in self.apply(MigrationRequested(kernel, replica, to)):
                assert isinstance(a, (Migrate, MigrationRefused)) and a.replica_id == replica

    @rule(kernel=st.sampled_from(KERNELS), host=st.sampled_from(HOSTS), gpus=st.integers(0, 2))
    def adopt(self, kernel: str, host: str, gpus: int) -> None:
        # What a restarted gateway (or a failed migration) reports; it ignores the cap.
        self.apply(ReplicaAdopted(kernel, f"{kernel}-adopted", host, Resources(gpus, 500, 1024)))
        self.shrunk.add(host)

    @rule(kernel=st.sampled_from(KERNELS))
    def stop_kernel(self, kernel: str) -> None:
        self.apply(KernelStopped(kernel))

    @rule(job=st.sampled_from(JOBS), host=st.sampled_from(HOSTS), gpus=st.integers(1, 2))
    def request_job_gpus(self, job: str, host: str, gpus: int) -> None:
        # As the job manager does: free devices of the host's view (a busy host: refused).
        view = self.s.hosts.get(host)
        free = view.free_devices if view is not None else [0, 1]
        self.apply(JobGpusRequested(job, host, tuple(free[:gpus])))

    @rule(job=st.sampled_from(JOBS))
    def release_job_gpus(self, job: str) -> None:
        self.apply(JobGpusReleased(job))

    @invariant()
    def accounting_is_sound(self) -> None:
        check_accounting(self.s, self.shrunk)

    def teardown(self) -> None:
        for kernel in list(self.s.kernels):
            self.apply(KernelStopped(kernel))
        for job in JOBS:
            self.apply(JobGpusReleased(job))
        assert self.s.kernels == {}
        assert self.s.waiting == ()
        for host in self.s.hosts.values():
            assert host.pending.is_zero(), host
            assert host.bound == () and host.replicas == () and host.jobs == ()
            assert not host.draining
        assert self.s.summary().committed_gpus == 0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_soak_with_many_hosts() -> None:
    """A seeded random workload on a larger cluster: many migrations, waits and finishes."""
    rng = random.Random(4)
    s = Scheduler()
    for i in range(12):
        s.handle(HostAdded(f"h{i:02d}", Resources(rng.choice([1, 2, 4]), 64_000, 128_000, 40)))
    for k in range(60):
        request = Resources(rng.randint(0, 2), 1000, 1024)
        s.handle(KernelRequested(f"k{k}", request, policy=rng.choice(["notebookos", "batch"])))
    kernels = list(s.kernels)
    terms: dict[str, int] = {}
    seen: Counter[str] = Counter()
    for step in range(3000):
        kernel_id = rng.choice(kernels)
        if kernel_id in terms and rng.random() < 0.6:
            event: Event = ExecutionFinished(kernel_id, terms.pop(kernel_id))
        elif kernel_id in terms:
            event = ExecutionCancelled(kernel_id, terms[kernel_id])
        else:
            terms[kernel_id] = step
            event = ExecutionRequested(kernel_id, step)
        for action in s.handle(event):
            seen[type(action).__name__] += 1
        check_accounting(s, set())
    assert seen["Migrate"] > 10 and seen["WaitForGpus"] > 10 and seen["CancelWait"] > 0
    for kernel_id in kernels:
        s.handle(KernelStopped(kernel_id))
    assert all(h.pending.is_zero() and not h.bound for h in s.hosts.values())
