"""An operator drains a host (``HostDrainRequested``) in the pure scheduler: no new replica,
migration, cell binding or job goes there; what runs there keeps running; cells of its kernels
bind (or migrate) elsewhere; undraining gives its GPUs back to waiting cells."""

from __future__ import annotations

from typing import TypeVar

from hypothesis import given
from hypothesis import strategies as st

from nbcluster.scheduling import (
    Action,
    BindGpus,
    BindJobGpus,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostDrainRequested,
    HostResourcesChanged,
    JobGpusRefused,
    JobGpusRequested,
    KernelRequested,
    Migrate,
    MigrationRefused,
    MigrationRequested,
    PlaceReplicas,
    RejectKernel,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    Scheduler,
    WaitForGpus,
)

T = TypeVar("T")

HOST = Resources(gpus=1, millicpus=64_000, memory_mb=128_000, vram_gb=40.0)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)


def cluster(hosts: int) -> Scheduler:
    s = Scheduler()
    for i in range(hosts):
        assert s.handle(HostAdded(f"h{i}", HOST)) == []
    return s


def of_type(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def one(actions: list[Action], kind: type[T]) -> T:
    [found] = of_type(actions, kind)
    return found


def test_a_drained_host_takes_no_new_replica_until_undrained() -> None:
    s = cluster(3)
    assert s.handle(HostDrainRequested("h0")) == []
    assert s.hosts["h0"].draining
    for k in range(3):
        place = one(s.handle(KernelRequested(f"k{k}", ONE_GPU, replicas=2)), PlaceReplicas)
        assert "h0" not in {h for _, h in place.replicas}
    # Three replicas need three hosts: one is draining, so the kernel is refused as full.
    reject = one(s.handle(KernelRequested("big", ONE_GPU)), RejectKernel)
    assert reject.full
    assert s.handle(HostDrainRequested("h0", draining=False)) == []
    assert not s.hosts["h0"].draining
    place = one(s.handle(KernelRequested("big", ONE_GPU)), PlaceReplicas)
    assert "h0" in {h for _, h in place.replicas}


def test_what_runs_there_keeps_running_and_cells_bind_elsewhere() -> None:
    s = cluster(3)
    place = one(s.handle(KernelRequested("k", ONE_GPU)), PlaceReplicas)
    first = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    # Draining the host of the executing replica leaves its replicas and its binding alone.
    s.handle(HostDrainRequested(first.host))
    view = s.kernels["k"]
    assert dict(view.replicas) == dict(place.replicas)
    assert view.binding is not None and view.binding.host == first.host
    s.handle(ExecutionFinished("k", 1))
    # The next cell prefers the previous executor, but its host is draining: another replica.
    second = one(s.handle(ExecutionRequested("k", 2, preferred_replica=first.replica_id)), BindGpus)
    assert second.host != first.host
    assert dict(s.kernels["k"].replicas) == dict(place.replicas)


def test_a_replica_on_a_drained_host_migrates_when_its_cell_finds_no_other() -> None:
    s = cluster(4)
    place = one(s.handle(KernelRequested("k", ONE_GPU)), PlaceReplicas)
    [free] = {"h0", "h1", "h2", "h3"} - {h for _, h in place.replicas}
    drained = place.replicas[0][1]
    others = [h for _, h in place.replicas[1:]]
    for n, host in enumerate(others):  # the other replicas' hosts are busy
        s.handle(JobGpusRequested(f"job{n}", host, (0,)))
    s.handle(HostDrainRequested(drained))
    actions = s.handle(ExecutionRequested("k", 1, preferred_replica=place.replicas[0][0]))
    migrate = one(actions, Migrate)
    assert (migrate.from_host, migrate.to_host) == (drained, free)
    assert one(actions, BindGpus).host == free


def test_operator_migration_and_replacement_avoid_a_drained_host() -> None:
    s = cluster(4)
    place = one(s.handle(KernelRequested("k", ONE_GPU)), PlaceReplicas)
    [free] = {"h0", "h1", "h2", "h3"} - {h for _, h in place.replicas}
    s.handle(HostDrainRequested(free))
    rid = place.replicas[0][0]
    refused = one(s.handle(MigrationRequested("k", rid, to_host=free)), MigrationRefused)
    assert free in refused.reason
    assert of_type(s.handle(MigrationRequested("k", rid)), MigrationRefused)
    # A lost replica is not replaced on the drained host either.
    s.handle(ReplicaStopped("k", rid))
    replacement = one(s.handle(ReplicaRequested("k")), PlaceReplicas)
    assert free not in {h for _, h in replacement.replicas}


def test_a_job_is_refused_gpus_on_a_drained_host() -> None:
    s = cluster(2)
    s.handle(HostDrainRequested("h0"))
    refused = one(s.handle(JobGpusRequested("job", "h0", (0,))), JobGpusRefused)
    assert refused.reason == "host h0 is draining"
    assert one(s.handle(JobGpusRequested("job", "h1", (0,))), BindJobGpus).host == "h1"


def test_undraining_binds_a_waiting_cell() -> None:
    s = Scheduler()
    s.handle(HostAdded("only", HOST))
    one(s.handle(KernelRequested("k", ONE_GPU, replicas=1, policy="batch")), PlaceReplicas)
    s.handle(HostDrainRequested("only"))
    assert of_type(s.handle(ExecutionRequested("k", 1)), WaitForGpus)
    bind = one(s.handle(HostDrainRequested("only", draining=False)), BindGpus)
    assert (bind.kernel_id, bind.term, bind.host) == ("k", 1, "only")


def test_unknown_host_is_ignored_and_a_shrunk_host_stays_draining() -> None:
    s = Scheduler()
    assert s.handle(HostDrainRequested("nowhere")) == []
    s.handle(HostAdded("big", Resources(2, 64_000, 128_000, 40), (0, 1)))
    s.handle(KernelRequested("k", Resources(gpus=1), replicas=1, policy="batch"))
    bind = one(s.handle(ExecutionRequested("k", 1)), BindGpus)
    # Shrunk below the device the cell holds (drained by itself), then drained and undrained
    # by the operator: it stays draining until the cell ends.
    [kept] = {0, 1} - set(bind.device_indices)
    s.handle(HostResourcesChanged("big", Resources(1, 64_000, 128_000, 40), (kept,)))
    s.handle(HostDrainRequested("big"))
    s.handle(HostDrainRequested("big", draining=False))
    assert s.hosts["big"].draining
    s.handle(ExecutionFinished("k", 1))
    assert not s.hosts["big"].draining
    # An operator's drain survives the host re-registering (a reconnect with a new spec).
    s.handle(HostDrainRequested("big"))
    s.handle(HostAdded("big", Resources(2, 64_000, 128_000, 40), (0, 1)))
    assert s.hosts["big"].draining


@given(
    drained=st.sets(st.integers(0, 5), max_size=5),
    replicas=st.lists(st.integers(1, 3), min_size=1, max_size=8),
)
def test_no_placement_ever_lands_on_a_drained_host(drained: set[int], replicas: list[int]) -> None:
    s = Scheduler()
    for i in range(6):
        s.handle(HostAdded(f"h{i}", Resources(gpus=1, millicpus=64_000, memory_mb=128_000)))
    for i in drained:
        s.handle(HostDrainRequested(f"h{i}"))
    names = {f"h{i}" for i in drained}
    for k, count in enumerate(replicas):
        for a in s.handle(KernelRequested(f"k{k}", Resources(), replicas=count)):
            if isinstance(a, PlaceReplicas):
                assert not names & {h for _, h in a.replicas}
        for a in s.handle(ExecutionRequested(f"k{k}", 1)):
            if isinstance(a, BindGpus | Migrate):
                assert (a.host if isinstance(a, BindGpus) else a.to_host) not in names


def test_only_an_admin_may_drain_or_undrain() -> None:
    from nbcluster.identity import Principal, route_allowed

    path = "/api/cluster/hosts/host-1/drain"
    for method in ("POST", "DELETE"):
        assert route_allowed(Principal(role="admin", user="admin"), method, path)
        assert not route_allowed(Principal(role="user", user="alice"), method, path)
        assert not route_allowed(Principal(role="host"), method, path)
