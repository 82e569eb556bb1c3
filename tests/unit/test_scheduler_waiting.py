"""The waiting queue (issue 18 follow-up): the indexed retry decides exactly as the plain
walk over every queued cell did (a differential property against that walk, kept here as the
reference), and a waiting cell asks the auto-scaler for a host only when a new host would let
it run (a migration there), never under a policy that cannot migrate."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbcluster.scheduling import (
    Action,
    BindGpus,
    Event,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    HostResourcesChanged,
    JobGpusReleased,
    JobGpusRequested,
    KernelRequested,
    KernelStopped,
    MigrationRequested,
    RejectKernel,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleOut,
    Scheduler,
    UserQuotaSet,
    WaitForGpus,
)

HOST = Resources(gpus=1, millicpus=64_000, memory_mb=128_000, vram_gb=40.0)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)


class FullWalkScheduler(Scheduler):
    """The scheduler with the retry it had before issue 18's follow-up: every queued cell, in
    queue order, is tried (the reference the indexed retry must match)."""

    def _retry_waiting(self) -> list[Action]:
        actions: list[Action] = []
        most_free = self._index.most_free()
        for kernel_id, term in self.waiting:
            wait = self._queue.get(kernel_id, term)
            if wait is None:
                continue  # bound earlier in this walk
            kernel = self._kernels[kernel_id]
            gpus = kernel.request.gpus if wait.gpus is None else wait.gpus
            if gpus > most_free:
                continue
            if kernel.binding is not None or kernel.waiting[0] != term:
                continue
            if self._quotas.over(kernel, gpus) is not None:
                continue
            bound = self._binder.try_bind(kernel, term, wait.preferred, gpus)
            if bound is not None:
                self._queue.remove(kernel, term)
                actions += bound
                most_free = self._index.most_free()
        return actions


HOSTS = ("h0", "h1", "h2", "h3")
KERNELS = ("a", "b", "c", "d", "e")
POLICIES = ("notebookos", "batch", "reservation")


def _replica(kernel: str, number: int) -> str:
    return f"{kernel}-r{number}"


replica_ids = st.tuples(st.sampled_from(KERNELS), st.integers(1, 5))

events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        HostAdded,
        st.sampled_from(HOSTS),
        st.builds(
            Resources,
            gpus=st.integers(1, 3),
            millicpus=st.just(64_000),
            memory_mb=st.just(128_000),
        ),
    ),
    st.builds(HostRemoved, st.sampled_from(HOSTS)),
    st.builds(
        HostResourcesChanged,
        st.sampled_from(HOSTS),
        st.builds(
            Resources, gpus=st.integers(0, 3), millicpus=st.just(64_000), memory_mb=st.just(128_000)
        ),
    ),
    st.builds(
        KernelRequested,
        st.sampled_from(KERNELS),
        st.builds(Resources, gpus=st.integers(0, 2), millicpus=st.just(1000)),
        st.one_of(st.none(), st.integers(1, 3)),
        st.sampled_from(POLICIES),
        owner=st.sampled_from(("u1", "u2")),
    ),
    st.builds(ReplicaRequested, st.sampled_from(KERNELS)),
    replica_ids.map(lambda r: ReplicaReady(r[0], _replica(*r))),
    st.tuples(replica_ids, st.booleans()).map(
        lambda r: ReplicaStopped(r[0][0], _replica(*r[0]), r[1])
    ),
    st.builds(
        ExecutionRequested,
        st.sampled_from(KERNELS),
        st.integers(1, 6),
        st.none(),
        st.one_of(st.none(), st.integers(0, 2)),
    ),
    st.builds(ExecutionFinished, st.sampled_from(KERNELS), st.integers(1, 6)),
    st.builds(ExecutionCancelled, st.sampled_from(KERNELS), st.integers(1, 6)),
    replica_ids.map(lambda r: MigrationRequested(r[0], _replica(*r))),
    st.builds(KernelStopped, st.sampled_from(KERNELS)),
    st.builds(
        JobGpusRequested,
        st.sampled_from(("j1", "j2")),
        st.sampled_from(HOSTS),
        st.sampled_from(((0,), (1,), (0, 1))),
        owner=st.sampled_from(("u1", "u2")),
    ),
    st.builds(JobGpusReleased, st.sampled_from(("j1", "j2"))),
    st.builds(UserQuotaSet, st.sampled_from(("u1", "u2")), st.one_of(st.none(), st.integers(0, 3))),
)


hosts_first = st.lists(
    st.builds(
        HostAdded,
        st.sampled_from(HOSTS),
        st.builds(
            Resources,
            gpus=st.sampled_from((1, 1, 2)),
            millicpus=st.just(64_000),
            memory_mb=st.just(128_000),
        ),
    ),
    min_size=4,
    max_size=4,
    unique_by=lambda e: e.name,
)
kernels_first = st.lists(
    st.builds(
        KernelRequested,
        st.sampled_from(KERNELS),
        st.builds(Resources, gpus=st.sampled_from((1, 1, 2)), millicpus=st.just(1000)),
        st.sampled_from((None, 2)),  # two replicas on four hosts: room to migrate
        st.sampled_from(POLICIES),
    ),
    min_size=5,
    max_size=5,
    unique_by=lambda e: e.kernel_id,
)
# Mostly cells coming and going, so that queues form and drain.
cells = st.one_of(
    st.builds(ExecutionRequested, st.sampled_from(KERNELS), st.integers(1, 4)),
    st.builds(ExecutionFinished, st.sampled_from(KERNELS), st.integers(1, 4)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hosts_first, kernels_first, st.lists(st.one_of(cells, cells, events), min_size=20, max_size=60)
)
def test_the_indexed_retry_decides_as_walking_the_whole_queue(
    hosts: list[Event], kernels: list[Event], sequence: list[Event]
) -> None:
    indexed, reference = Scheduler(), FullWalkScheduler()
    for event in [*hosts, *kernels, *sequence]:
        try:
            expected: list[Action] | str = reference.handle(event)
        except ValueError as exc:
            expected = str(exc)
        try:
            got: list[Action] | str = indexed.handle(event)
        except ValueError as exc:
            got = str(exc)
        assert got == expected, event
        assert indexed.waiting == reference.waiting
        assert indexed.summary() == reference.summary()


def busy_cluster(policy: str, replicas: int | None = None) -> Scheduler:
    """Three one-GPU hosts whose GPUs kernels x0..x2 hold, and kernel k placed with
    ``policy`` (and ``replicas``)."""
    s = Scheduler()
    for i in range(3):
        s.handle(HostAdded(f"h{i}", HOST))
    s.handle(KernelRequested("k", ONE_GPU, replicas, policy))
    for i in range(3):
        s.handle(KernelRequested(f"x{i}", ONE_GPU, 1, "batch"))
        assert isinstance(s.handle(ExecutionRequested(f"x{i}", 1))[0], BindGpus)
    assert s.summary().committed_gpus == 3
    return s


def test_a_waiting_batch_cell_asks_for_no_host() -> None:
    s = busy_cluster("batch")
    actions = s.handle(ExecutionRequested("k", 1))
    assert [type(a) for a in actions] == [WaitForGpus]
    assert list(s.waiting) == [("k", 1)]


def test_a_waiting_lone_replica_cell_asks_for_no_host() -> None:
    s = busy_cluster("notebookos", replicas=1)
    assert [type(a) for a in s.handle(ExecutionRequested("k", 1))] == [WaitForGpus]


def test_a_waiting_cell_that_could_migrate_asks_for_a_host_and_moves_there() -> None:
    s = busy_cluster("notebookos")
    wait, scale = s.handle(ExecutionRequested("k", 1))
    assert isinstance(wait, WaitForGpus)
    assert scale == ScaleOut(1, "a cell of k waits for 1 GPUs")
    actions = s.handle(HostAdded("h3", HOST))
    assert [type(a).__name__ for a in actions] == ["Migrate", "BindGpus"]
    assert isinstance(actions[1], BindGpus) and actions[1].host == "h3"


def test_a_batch_kernel_that_finds_no_room_still_asks_for_a_host() -> None:
    # Placement, unlike a waiting cell, is helped by a new host.
    s = Scheduler()
    s.handle(HostAdded("h0", Resources(gpus=1, millicpus=1000, memory_mb=1024)))
    for k in range(3 * 7):  # up to the subscription cap: 7 x 3 replicas' worth of its CPUs
        assert s.handle(KernelRequested(f"k{k}", ONE_GPU, 1, "batch"))
    actions = s.handle(KernelRequested("full", ONE_GPU, 1, "batch"))
    assert [type(a) for a in actions] == [RejectKernel, ScaleOut]


def test_cells_start_in_queue_order_and_a_kernels_cells_in_term_order() -> None:
    s = Scheduler()
    s.handle(HostAdded("h0", Resources(gpus=2, millicpus=64_000, memory_mb=128_000)))
    for k in ("a", "b", "c"):
        s.handle(KernelRequested(k, ONE_GPU, 1, "batch"))
    s.handle(ExecutionRequested("a", 1))
    s.handle(ExecutionRequested("b", 1))
    for k, term in (("c", 1), ("a", 2), ("c", 2), ("b", 2)):
        assert isinstance(s.handle(ExecutionRequested(k, term))[0], WaitForGpus)
    assert list(s.waiting) == [("c", 1), ("a", 2), ("c", 2), ("b", 2)]
    # One GPU frees: the oldest cell takes it, not a's own next cell.
    bound = [a for a in s.handle(ExecutionFinished("a", 1)) if isinstance(a, BindGpus)]
    assert [(b.kernel_id, b.term) for b in bound] == [("c", 1)]
    bound = [a for a in s.handle(ExecutionFinished("b", 1)) if isinstance(a, BindGpus)]
    assert [(b.kernel_id, b.term) for b in bound] == [("a", 2)]
    assert list(s.waiting) == [("c", 2), ("b", 2)]
    # Stopping a kernel takes all its cells out of the queue and frees its GPU for the next.
    bound = [a for a in s.handle(KernelStopped("c")) if isinstance(a, BindGpus)]
    assert [(b.kernel_id, b.term) for b in bound] == [("b", 2)]
    assert list(s.waiting) == []
