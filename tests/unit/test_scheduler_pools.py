"""Host pools in the pure scheduler (issue 15, "Placement by pool"): a kernel that names a pool
has its replicas placed, replaced and moved only onto that pool's hosts; a kernel without one
goes anywhere."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nbcluster.scheduling import (
    Action,
    BindGpus,
    Event,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
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
    ReplicaAdopted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleOut,
    Scheduler,
    SchedulerConfig,
    WaitForGpus,
)

HOST = Resources(gpus=1, millicpus=64_000, memory_mb=128_000, vram_gb=40.0)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)
CPU = Resources(gpus=0, millicpus=1000, memory_mb=1024)


def pooled(**hosts: str | None) -> Scheduler:
    """A scheduler with these hosts (name -> pool), each of spec ``HOST``."""
    s = Scheduler()
    for name, pool in hosts.items():
        assert s.handle(HostAdded(name, HOST, pool=pool)) == []
    return s


def placed_hosts(actions: list[Action]) -> set[str]:
    return {h for a in actions if isinstance(a, PlaceReplicas) for _, h in a.replicas}


def test_views_show_pools() -> None:
    s = pooled(a1="a", n1=None)
    assert s.hosts["a1"].pool == "a"
    assert s.hosts["n1"].pool is None
    s.handle(KernelRequested("k", CPU, replicas=1, pool="a"))
    assert s.kernels["k"].pool == "a"


def test_a_pooled_kernel_is_placed_only_in_its_pool() -> None:
    s = pooled(a1="a", a2="a", b1="b", n1=None, n2=None)
    actions = s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    assert placed_hosts(actions) == {"a1", "a2"}
    actions = s.handle(KernelRequested("kb", ONE_GPU, replicas=1, pool="b"))
    assert placed_hosts(actions) == {"b1"}


def test_a_kernel_without_a_pool_may_use_any_host() -> None:
    s = pooled(a1="a", b1="b", c1="c")
    actions = s.handle(KernelRequested("k", ONE_GPU, replicas=3))
    assert placed_hosts(actions) == {"a1", "b1", "c1"}


def test_a_pool_with_too_few_hosts_refuses_without_scaling_out() -> None:
    s = pooled(a1="a", n1=None, n2=None)
    actions = s.handle(KernelRequested("k", ONE_GPU, replicas=3, pool="a"))
    assert len(actions) == 1 and isinstance(actions[0], RejectKernel)
    assert "in pool 'a'" in actions[0].reason and "1 have room" in actions[0].reason
    assert actions[0].full  # only full now: a later attempt may succeed (503, not 400)
    assert "k" not in s.kernels
    # Without a pool the same shortage asks the auto-scaler for hosts.
    s2 = pooled(a1="a")
    assert any(
        isinstance(a, ScaleOut) for a in s2.handle(KernelRequested("k", ONE_GPU, replicas=3))
    )


def test_an_unknown_pool_is_refused_with_its_name() -> None:
    s = pooled(a1="a", n1=None)
    actions = s.handle(KernelRequested("k", CPU, replicas=1, pool="a100"))
    assert actions == [RejectKernel("k", "no host is in pool 'a100'")]
    assert not actions[0].full  # no host could ever take it (400)


def test_too_big_is_judged_within_the_pool() -> None:
    s = Scheduler()
    s.handle(HostAdded("big", Resources(4, 64_000, 128_000, 160.0)))
    s.handle(HostAdded("small", HOST, pool="small"))
    actions = s.handle(KernelRequested("k", Resources(2, 1000, 1024), replicas=1, pool="small"))
    assert actions == [RejectKernel("k", "requests 2 GPUs; the largest host in pool 'small' has 1")]
    # The same request without a pool fits the big host.
    assert placed_hosts(s.handle(KernelRequested("k2", Resources(2, 1000, 1024), 1))) == {"big"}


def test_reservation_takes_free_gpus_only_in_its_pool() -> None:
    s = pooled(n1=None, a1="a")
    actions = s.handle(KernelRequested("k", ONE_GPU, 1, "reservation", pool="a"))
    bind = [a for a in actions if isinstance(a, BindGpus)]
    assert placed_hosts(actions) == {"a1"} and bind[0].host == "a1"
    actions = s.handle(KernelRequested("k2", ONE_GPU, 1, "reservation", pool="a"))
    assert len(actions) == 1 and isinstance(actions[0], RejectKernel)
    assert "no host in pool 'a' has 1 free GPUs" in actions[0].reason
    assert actions[0].full


def test_a_replacement_replica_stays_in_the_pool() -> None:
    s = pooled(a1="a", a2="a", a3="a", n1=None, n2=None)
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    replica, lost = s.kernels["k"].replicas[0]
    s.handle(HostRemoved(lost))
    assert replica not in dict(s.kernels["k"].replicas)
    placed = placed_hosts(s.handle(ReplicaRequested("k")))
    assert placed == {"a1", "a2", "a3"} - {lost} - {h for _, h in s.kernels["k"].replicas[:1]}
    assert {h for _, h in s.kernels["k"].replicas} <= {"a1", "a2", "a3"}


def test_replacement_in_a_full_pool_places_nothing() -> None:
    s = pooled(a1="a", a2="a", n1=None)
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    assert s.handle(ReplicaRequested("k")) == []
    assert {h for _, h in s.kernels["k"].replicas} == {"a1", "a2"}
    # Without a pool it would go to n1.
    s2 = pooled(a1="a", a2="a", n1=None)
    s2.handle(KernelRequested("k", ONE_GPU, replicas=2))
    assert placed_hosts(s2.handle(ReplicaRequested("k"))) == {"n1"}


def test_explicit_migration_outside_the_pool_is_refused() -> None:
    s = pooled(a1="a", a2="a", b1="b", n1=None)
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    replica = s.kernels["k"].replicas[0][0]
    for target, where in (("b1", "pool 'b'"), ("n1", "no pool")):
        [refused] = s.handle(MigrationRequested("k", replica, target))
        assert isinstance(refused, MigrationRefused)
        assert refused.reason == (f"host {target} is in {where}; kernel k runs only in pool 'a'")
    # Without a target: no other host of pool a has room.
    [refused] = s.handle(MigrationRequested("k", replica, None))
    assert isinstance(refused, MigrationRefused)
    assert refused.reason.startswith("no other host in pool 'a' has room")


def test_migration_without_a_target_picks_a_host_of_the_pool() -> None:
    s = pooled(a1="a", a2="a", n1=None, n2=None, a3="a")
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    replica, source = s.kernels["k"].replicas[0]
    [move] = s.handle(MigrationRequested("k", replica, None))
    assert isinstance(move, Migrate) and move.from_host == source and move.to_host == "a3"
    [refused] = s.handle(MigrationRequested("k", move.new_replica_id, "a3"))
    assert isinstance(refused, MigrationRefused)  # it is already there


def test_a_waiting_cell_migrates_only_within_its_pool() -> None:
    s = pooled(a1="a", a2="a", n1=None)
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    # Jobs hold the pool's GPUs; n1's GPU is free but outside the pool.
    s.handle(JobGpusRequested("j1", "a1", (0,)))
    s.handle(JobGpusRequested("j2", "a2", (0,)))
    actions = s.handle(ExecutionRequested("k", 1, None))
    assert len(actions) == 1 and isinstance(actions[0], WaitForGpus)  # no ScaleOut either
    # A new host in the pool: the waiting cell migrates there and runs.
    actions = s.handle(HostAdded("a3", HOST, pool="a"))
    moves = [a for a in actions if isinstance(a, Migrate)]
    binds = [a for a in actions if isinstance(a, BindGpus)]
    assert [m.to_host for m in moves] == ["a3"] and binds[0].host == "a3"


def test_freed_gpus_outside_the_pool_do_not_bind_a_pooled_cell() -> None:
    s = pooled(a1="a", a2="a", n1=None)
    s.handle(JobGpusRequested("jn", "n1", (0,)))
    s.handle(KernelRequested("k", ONE_GPU, replicas=2, pool="a"))
    s.handle(JobGpusRequested("j1", "a1", (0,)))
    s.handle(JobGpusRequested("j2", "a2", (0,)))
    assert isinstance(s.handle(ExecutionRequested("k", 1, None))[0], WaitForGpus)
    assert s.handle(JobGpusReleased("jn")) == []
    binds = [a for a in s.handle(JobGpusReleased("j2")) if isinstance(a, BindGpus)]
    assert [b.host for b in binds] == ["a2"]
    s.handle(ExecutionFinished("k", 1))


def test_adopted_replicas_keep_the_kernels_pool() -> None:
    s = pooled(a1="a", a2="a", n1=None)
    s.handle(ReplicaAdopted("k", "k-r1", "a1", ONE_GPU, pool="a"))
    s.handle(ReplicaAdopted("k", "k-r2", "a2", ONE_GPU, pool="a"))
    assert s.kernels["k"].pool == "a"
    assert s.handle(ReplicaRequested("k")) == []  # n1 is not in pool a
    s.handle(KernelAdopted("k2", ONE_GPU, pool="a"))
    s.handle(ReplicaAdopted("k2", "k2-r1", "a1", ONE_GPU))
    assert s.kernels["k2"].pool == "a"
    assert placed_hosts(s.handle(ReplicaRequested("k2"))) == {"a2"}


def test_a_host_that_changes_pool_takes_the_new_pools_kernels() -> None:
    s = pooled(h="a")
    s.handle(HostAdded("h", HOST, pool="b"))  # reconnects in another pool
    assert s.hosts["h"].pool == "b"
    assert s.handle(KernelRequested("k", CPU, 1, pool="a")) == [
        RejectKernel("k", "no host is in pool 'a'")
    ]
    assert placed_hosts(s.handle(KernelRequested("k", CPU, 1, pool="b"))) == {"h"}


# ----------------------------------------------------------------- property

HOST_POOLS = {"h0": "a", "h1": "a", "h2": "a", "h3": "b", "h4": None, "h5": None}
KERNELS = ["k0", "k1", "k2", "k3", "k4", "k5"]
KERNEL_POOLS = {"k0": "a", "k1": "b", "k2": None, "k3": "a", "k4": None, "k5": "a"}
#: Kernels confined to named hosts too (a kernelspec's ``remote_hosts``).
KERNEL_HOSTS = {"k4": frozenset({"h1", "h4", "h9"}), "k5": frozenset({"h0", "h4"})}


class PoolMachine(RuleBasedStateMachine):
    """Random event sequences: no replica of a pooled kernel is ever placed, moved or bound
    on a host outside its pool, nor one of a kernel confined to hosts on another host; a
    scale-out asked for a confined kernel names its hosts."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(SchedulerConfig(max_subscription_ratio=2.0))
        self.term = 0
        self.terms: dict[str, list[int]] = {}

    def apply(self, event: Event) -> list[Action]:
        actions = self.s.handle(event)
        for a in actions:
            host = None
            kernel = None
            if isinstance(a, PlaceReplicas):
                kernel = a.kernel_id
                for _, h in a.replicas:
                    self.check(kernel, h)
            elif isinstance(a, Migrate):
                kernel, host = a.kernel_id, a.to_host
            elif isinstance(a, BindGpus):
                kernel, host = a.kernel_id, a.host
            elif isinstance(a, ScaleOut) and isinstance(event, KernelRequested):
                assert event.pool is None, "a scale-out for a pooled kernel"
                assert a.among == event.hosts, "a confined kernel's scale-out names its hosts"
            if kernel is not None and host is not None:
                self.check(kernel, host)
        return actions

    def check(self, kernel: str, host: str) -> None:
        pool = KERNEL_POOLS[kernel]
        assert pool is None or HOST_POOLS[host] == pool, (kernel, host)
        assert host in KERNEL_HOSTS.get(kernel, {host}), (kernel, host)

    @rule(name=st.sampled_from(sorted(HOST_POOLS)), gpus=st.integers(0, 3))
    def add_host(self, name: str, gpus: int) -> None:
        spec = Resources(gpus, 4000, 8192, 16.0 * gpus)
        self.apply(HostAdded(name, spec, pool=HOST_POOLS[name]))

    @rule(name=st.sampled_from(sorted(HOST_POOLS)))
    def remove_host(self, name: str) -> None:
        self.apply(HostRemoved(name))

    @rule(
        kernel=st.sampled_from(KERNELS),
        gpus=st.integers(0, 2),
        policy=st.sampled_from(["notebookos", "reservation", "batch"]),
        replicas=st.sampled_from([None, 1, 2]),
    )
    def request_kernel(self, kernel: str, gpus: int, policy: str, replicas: int | None) -> None:
        request = Resources(gpus, 500, 1024, 2.0 * gpus)
        self.apply(
            KernelRequested(
                kernel,
                request,
                replicas,
                policy,
                pool=KERNEL_POOLS[kernel],
                hosts=KERNEL_HOSTS.get(kernel),
            )
        )

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

    @rule(kernel=st.sampled_from(KERNELS), prefer=st.integers(0, 3))
    def execute(self, kernel: str, prefer: int) -> None:
        self.term += 1
        view = self.s.kernels.get(kernel)
        preferred = None
        if view and prefer < len(view.replicas):
            preferred = view.replicas[prefer][0]
        self.terms.setdefault(kernel, []).append(self.term)
        self.apply(ExecutionRequested(kernel, self.term, preferred))

    @rule(kernel=st.sampled_from(KERNELS), which=st.integers(0, 3))
    def finish(self, kernel: str, which: int) -> None:
        terms = self.terms.get(kernel)
        if terms:
            self.apply(ExecutionFinished(kernel, terms[which % len(terms)]))

    @rule(
        kernel=st.sampled_from(KERNELS),
        index=st.integers(0, 2),
        to=st.sampled_from([None, *sorted(HOST_POOLS)]),
    )
    def migrate(self, kernel: str, index: int, to: str | None) -> None:
        view = self.s.kernels.get(kernel)
        if view and view.replicas:
            replica = view.replicas[index % len(view.replicas)][0]
            self.apply(MigrationRequested(kernel, replica, to))

    @rule(job=st.sampled_from(["j0", "j1"]), host=st.sampled_from(sorted(HOST_POOLS)))
    def request_job_gpus(self, job: str, host: str) -> None:
        view = self.s.hosts.get(host)
        free = view.free_devices if view is not None else [0]
        self.apply(JobGpusRequested(job, host, tuple(free[:1])))

    @rule(job=st.sampled_from(["j0", "j1"]))
    def release_job_gpus(self, job: str) -> None:
        self.apply(JobGpusReleased(job))

    @rule(kernel=st.sampled_from(KERNELS))
    def stop_kernel(self, kernel: str) -> None:
        self.apply(KernelStopped(kernel))

    @invariant()
    def replicas_stay_in_their_pool(self) -> None:
        for kernel in self.s.kernels.values():
            assert kernel.pool == KERNEL_POOLS[kernel.kernel_id]
            assert kernel.hosts == KERNEL_HOSTS.get(kernel.kernel_id)
            for _, host in kernel.replicas:
                self.check(kernel.kernel_id, host)
            if kernel.binding is not None:
                self.check(kernel.kernel_id, kernel.binding.host)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
