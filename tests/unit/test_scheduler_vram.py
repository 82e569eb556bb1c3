"""GPU memory in the pure scheduler (issue 12): per-device capacity and ``KERNEL_VRAM_GB``,
memory replicas keep between cells (``DeviceMemoryReported``), and evictions as actions
(``Evict`` out, ``EvictionFinished`` in) before a cell starts on a device another replica
holds memory on; hypothesis invariants on top of ``test_scheduler``'s state machine."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbcluster.scheduling import (
    GIB,
    Action,
    BindGpus,
    BindJobGpus,
    CancelWait,
    DeviceMemoryReported,
    Event,
    Evict,
    EvictionFinished,
    EvictionWait,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    JobGpusReleased,
    JobGpusRequested,
    KernelRequested,
    KernelStopped,
    PlaceReplicas,
    RefuseCell,
    RejectKernel,
    ReleaseGpus,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    Scheduler,
    SchedulerConfig,
    WaitForGpus,
)

from .test_scheduler import HOSTS, KERNELS, SchedulerMachine, check_accounting

ONE_GPU_HOST = Resources(gpus=1, millicpus=8000, memory_mb=16384, vram_gb=40.0)
TWO_GPU_HOST = Resources(gpus=2, millicpus=8000, memory_mb=16384, vram_gb=80.0)
#: One GPU and 8 GB of it.
SMALL = Resources(gpus=1, millicpus=1000, memory_mb=1024, vram_gb=8.0)


def batch_kernel(s: Scheduler, kernel_id: str, request: Resources = SMALL) -> str:
    """Place a one-replica kernel whose cells bind per cell; returns its replica id."""
    [place] = s.handle(KernelRequested(kernel_id, request, policy="batch"))
    assert isinstance(place, PlaceReplicas), place
    return place.replicas[0][0]


def run_cell(s: Scheduler, kernel_id: str, term: int) -> BindGpus:
    [bind] = s.handle(ExecutionRequested(kernel_id, term))
    assert isinstance(bind, BindGpus), bind
    return bind


def leave_memory(
    s: Scheduler, kernel_id: str, replica_id: str, term: int, held: dict[int, int]
) -> None:
    """The cell ends with ``held`` left on the GPUs (reported before its ``ExecutionFinished``,
    as the gateway does)."""
    assert s.handle(DeviceMemoryReported(kernel_id, replica_id, held)) == []
    released = s.handle(ExecutionFinished(kernel_id, term))
    assert isinstance(released[0], ReleaseGpus), released


def held(s: Scheduler, host: str, device: int) -> dict[tuple[str, str], int]:
    [view] = [d for d in s.device_memory(host) if d.device == device]
    return dict(view.held)


# ----------------------------------------------------------------- scenarios


def test_a_cell_waits_until_another_kernels_memory_has_left_the_gpu() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", ONE_GPU_HOST))
    a, b = batch_kernel(s, "a"), batch_kernel(s, "b")
    run_cell(s, "a", 1)
    leave_memory(s, "a", a, 1, {0: 10 * GIB})
    assert held(s, "h", 0) == {("a", a): 10 * GIB}

    actions = s.handle(ExecutionRequested("b", 1))
    [evict] = actions
    assert isinstance(evict, Evict)
    assert (evict.kernel_id, evict.replica_id, evict.host, evict.device_indices) == (
        "a",
        a,
        "h",
        (0,),
    )
    assert "kernel b needs GPU 0" in evict.reason
    # The device is b's now (nobody else gets it), but the cell has not started.
    assert s.parked == (("b", 1),)
    view = s.kernel("b")
    assert view is not None and view.binding is not None and view.binding.device_indices == (0,)
    [device] = s.device_memory("h")
    assert device.committed == 8 * GIB and device.evicting == ("a", a)
    assert s.handle(ExecutionRequested("b", 1)) == []  # asked again: still parked

    started = s.handle(EvictionFinished("a", a, (0,), True, 10 * GIB, 0.9))
    assert started == [BindGpus("b", 1, b, "h", (0,), EvictionWait((0,), 10 * GIB, 0.9, True))]
    assert s.parked == () and s.evictions == ()
    assert held(s, "h", 0) == {}


def test_memory_stays_as_a_cache_while_nobody_needs_the_device() -> None:
    """A kernel's next cell prefers the device its memory is on: no eviction, no wait."""
    s = Scheduler()
    s.handle(HostAdded("h", TWO_GPU_HOST))
    a, b = batch_kernel(s, "a"), batch_kernel(s, "b")
    assert s.handle(JobGpusRequested("j", "h", (0,))) == [BindJobGpus("j", "h", (0,))]
    assert run_cell(s, "a", 1).device_indices == (1,)
    leave_memory(s, "a", a, 1, {1: 4 * GIB})
    assert run_cell(s, "a", 2).device_indices == (1,)
    leave_memory(s, "a", a, 2, {1: 5 * GIB})
    # Another kernel with the choice of an empty device leaves a's memory alone.
    s.handle(JobGpusReleased("j"))
    bind = run_cell(s, "b", 1)
    assert (bind.replica_id, bind.device_indices) == (b, (0,))
    assert held(s, "h", 1) == {("a", a): 5 * GIB}


def test_a_kernels_own_memory_on_another_gpu_moves_before_its_next_cell() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", TWO_GPU_HOST))
    a = batch_kernel(s, "a")
    run_cell(s, "a", 1)
    # Its code used a second GPU explicitly: memory on both.
    leave_memory(s, "a", a, 1, {0: GIB, 1: 2 * GIB})
    [evict] = s.handle(ExecutionRequested("a", 2))
    assert isinstance(evict, Evict) and evict.device_indices == (1,)
    assert (evict.kernel_id, evict.replica_id) == ("a", a)
    assert "next cell runs on GPU 0" in evict.reason
    [bind] = s.handle(EvictionFinished("a", a, (1,), True, 2 * GIB, 0.2))
    assert isinstance(bind, BindGpus) and bind.device_indices == (0,)
    assert bind.evicted == EvictionWait((1,), 2 * GIB, 0.2, False)


def test_a_failed_eviction_refuses_the_cell_and_the_device_is_chosen_last() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", TWO_GPU_HOST))
    a, b = batch_kernel(s, "a"), batch_kernel(s, "b")
    assert s.handle(JobGpusRequested("j", "h", (1,))) == [BindJobGpus("j", "h", (1,))]
    run_cell(s, "a", 1)
    leave_memory(s, "a", a, 1, {0: 10 * GIB})
    [evict] = s.handle(ExecutionRequested("b", 1))
    assert isinstance(evict, Evict)
    s.handle(ExecutionRequested("b", 2))  # waits behind the parked cell
    actions = s.handle(EvictionFinished("a", a, (0,), False, error="no answer in 120 s"))
    refuse = actions[0]
    assert isinstance(refuse, RefuseCell) and (refuse.kernel_id, refuse.term) == ("b", 1)
    assert "still held by kernel a" in refuse.reason and "no answer in 120 s" in refuse.reason
    assert ReleaseGpus("b", 1, b, "h", (0,)) in actions
    # b's next cell gets GPU 0 again (the only free one) and asks again: a new attempt.
    assert Evict("a", a, "h", (0,), "kernel b needs GPU 0") in actions
    assert s.parked == (("b", 2),)
    assert held(s, "h", 0) == {("a", a): 10 * GIB}  # still held: the eviction failed
    s.handle(EvictionFinished("a", a, (0,), True, 10 * GIB, 1.0))
    s.handle(ExecutionFinished("b", 2))
    # With two free devices, one of them held after a failed eviction, it is chosen last.
    s.handle(DeviceMemoryReported("a", a, {0: GIB}))
    s.handle(ExecutionRequested("b", 3))
    s.handle(EvictionFinished("a", a, (0,), False, error="boom"))
    s.handle(JobGpusReleased("j"))
    assert run_cell(s, "b", 4).device_indices == (1,)


def test_an_eviction_in_flight_is_shared_and_a_parked_cell_can_be_interrupted() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", ONE_GPU_HOST))
    a, b, c = batch_kernel(s, "a"), batch_kernel(s, "b"), batch_kernel(s, "c")
    run_cell(s, "a", 1)
    leave_memory(s, "a", a, 1, {0: GIB})
    [evict] = s.handle(ExecutionRequested("b", 1))
    assert isinstance(evict, Evict)
    assert isinstance(s.handle(ExecutionRequested("c", 1))[0], WaitForGpus)
    # b is interrupted while it waits: its devices go to c, which waits for the same eviction.
    actions = s.handle(ExecutionCancelled("b", 1))
    assert actions[:2] == [ReleaseGpus("b", 1, b, "h", (0,)), CancelWait("b", 1)]
    assert not [x for x in actions if isinstance(x, Evict | BindGpus)]
    assert s.parked == (("c", 1),) and s.waiting == ()
    [bind] = s.handle(EvictionFinished("a", a, (0,), True, GIB, 0.1))
    assert isinstance(bind, BindGpus) and (bind.kernel_id, bind.replica_id) == ("c", c)


def test_memory_of_a_stopped_replica_needs_no_eviction() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", ONE_GPU_HOST))
    a, b = batch_kernel(s, "a"), batch_kernel(s, "b")
    run_cell(s, "a", 1)
    leave_memory(s, "a", a, 1, {0: GIB})
    [evict] = s.handle(ExecutionRequested("b", 1))
    assert isinstance(evict, Evict)
    s.handle(ReplicaStopped("a", a))  # its process, and its memory, are gone
    [bind] = s.handle(EvictionFinished("a", a, (0,), False, error="replica is not connected"))
    assert isinstance(bind, BindGpus) and bind.replica_id == b
    assert bind.evicted is not None and bind.evicted.freed_bytes == 0


def test_a_parked_cell_whose_host_goes_is_asked_for_again() -> None:
    s = Scheduler()
    s.handle(HostAdded("h1", ONE_GPU_HOST))
    s.handle(HostAdded("h2", ONE_GPU_HOST))
    s.handle(HostAdded("h3", ONE_GPU_HOST))
    [place] = s.handle(KernelRequested("k", SMALL))
    assert isinstance(place, PlaceReplicas)
    replicas = dict(place.replicas)
    [other] = s.handle(KernelRequested("o", SMALL, replicas=1))
    assert isinstance(other, PlaceReplicas)
    o, o_host = other.replicas[0]
    run_cell(s, "o", 1)
    leave_memory(s, "o", o, 1, {0: GIB})
    k_there = next(r for r, h in replicas.items() if h == o_host)
    # The other hosts are busy: k's cell can only run where o's memory is.
    hogs = [
        s.handle(JobGpusRequested(f"j{i}", h, (0,)))
        for i, h in enumerate({"h1", "h2", "h3"} - {o_host})
    ]
    assert all(isinstance(x[0], BindJobGpus) for x in hogs)
    [evict] = s.handle(ExecutionRequested("k", 1, k_there))
    assert isinstance(evict, Evict) and s.parked == (("k", 1),)
    actions = s.handle(HostRemoved(o_host))
    assert ReleaseGpus("k", 1, k_there, o_host, (0,)) in actions
    assert s.parked == () and s.waiting == (("k", 1),)
    assert s.handle(EvictionFinished("o", o, (0,), False)) == []  # an answer nobody awaits


def test_vram_per_gpu_is_checked_and_chooses_a_device_that_fits() -> None:
    s = Scheduler()
    small, big = 16 * GIB, 48 * GIB
    spec = Resources(gpus=2, millicpus=8000, memory_mb=16384, vram_gb=64.0)
    s.handle(HostAdded("h", spec, (0, 1), (small, big)))
    [reject] = s.handle(KernelRequested("x", Resources(1, 1000, 1024, 60.0), policy="batch"))
    assert isinstance(reject, RejectKernel)
    assert "60 GB of VRAM per GPU; the largest GPU has 48 GB" in reject.reason
    batch_kernel(s, "k", Resources(1, 1000, 1024, 30.0))
    bind = run_cell(s, "k", 1)
    assert bind.device_indices == (1,)
    committed = {d.device: d.committed for d in s.device_memory("h")}
    assert committed == {0: 0, 1: 30 * GIB}
    # The device that fits is taken: the next such cell waits rather than use GPU 0.
    batch_kernel(s, "k2", Resources(1, 1000, 1024, 30.0))
    assert isinstance(s.handle(ExecutionRequested("k2", 1))[0], WaitForGpus)


def test_a_job_given_held_devices_asks_for_an_eviction_without_waiting() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", ONE_GPU_HOST))
    a = batch_kernel(s, "a")
    run_cell(s, "a", 1)
    leave_memory(s, "a", a, 1, {0: GIB})
    actions = s.handle(JobGpusRequested("j", "h", (0,)))
    assert actions == [BindJobGpus("j", "h", (0,)), Evict("a", a, "h", (0,), "job j needs them")]


def test_reports_for_unknown_replicas_or_devices_are_ignored() -> None:
    s = Scheduler()
    s.handle(HostAdded("h", ONE_GPU_HOST))
    a = batch_kernel(s, "a")
    assert s.handle(DeviceMemoryReported("nope", a, {0: GIB})) == []
    assert s.handle(DeviceMemoryReported("a", "nope", {0: GIB})) == []
    assert s.handle(DeviceMemoryReported("a", a, {7: GIB, 0: 0})) == []
    assert held(s, "h", 0) == {}


# ----------------------------------------------------------------- invariants


class VramChecks:
    """Memory reports, eviction answers and the invariants of GPU memory, mixed into a state
    machine that has ``s`` (the scheduler) and ``shrunk`` (hosts whose spec shrank)."""

    s: Scheduler
    shrunk: set[str]
    outstanding: list[Evict]

    def apply(self, event: Event) -> list[Action]:
        actions = self.s.handle(event)
        for action in actions:
            if isinstance(action, RejectKernel):
                assert action.reason
            elif isinstance(action, Evict):
                self.outstanding.append(action)
            elif isinstance(action, BindGpus) and action.term is not None:
                self.check_clean_start(action)
        return actions

    def check_clean_start(self, bind: BindGpus) -> None:
        """A cell starts only on devices no other replica holds memory on, with none of its
        own replica's memory left on other devices of the host."""
        kernel = self.s.kernel(bind.kernel_id)
        assert kernel is not None and kernel.binding is not None
        if kernel.binding.term is None:
            return  # reservation: the devices were the kernel's all along
        me = (bind.kernel_id, bind.replica_id)
        for device in self.s.device_memory(bind.host):
            holders = {who for who, size in device.held if size > 0}
            if device.device in bind.device_indices:
                assert holders <= {me}, (bind, device)
            elif bind.device_indices:
                assert me not in holders, (bind, device)

    @initialize()
    def gpu_hosts_and_kernels(self) -> None:
        """Start where memory matters: GPU hosts, and kernels with GPUs and VRAM."""
        self.outstanding = []
        for number, name in enumerate(HOSTS[:3]):
            gpus = 1 + number // 2  # scarce: cells often need devices others hold memory on
            self.apply(HostAdded(name, Resources(gpus, 8000, 8192, 16.0 * gpus)))
        for number, kernel in enumerate(KERNELS[:5]):
            policy = "batch" if number % 2 else "notebookos"
            self.apply(KernelRequested(kernel, Resources(1, 500, 1024, 4.0), None, policy))

    @rule(
        kernel=st.sampled_from(KERNELS),
        size=st.integers(0, 8 * GIB),
        elsewhere=st.sampled_from([None, 0, 1, 2]),
    )
    def cell_ends_leaving_memory(self, kernel: str, size: int, elsewhere: int | None) -> None:
        """What the gateway does at a cell's reply: the memory report, then the finish."""
        view = self.s.kernel(kernel)
        if view is None or view.binding is None or view.binding.term is None:
            return
        held = dict.fromkeys(view.binding.device_indices, size)
        if elsewhere is not None:
            held[elsewhere] = size  # the cell's code used another GPU too
        self.apply(DeviceMemoryReported(kernel, view.binding.replica_id, held))
        self.apply(ExecutionFinished(kernel, view.binding.term))

    @rule(
        kernel=st.sampled_from(KERNELS),
        index=st.integers(0, 2),
        held=st.dictionaries(st.integers(0, 4), st.integers(0, 8 * GIB), max_size=3),
    )
    def report_memory(self, kernel: str, index: int, held: dict[int, int]) -> None:
        view = self.s.kernel(kernel)
        if view and view.replicas:
            replica = view.replicas[index % len(view.replicas)][0]
            self.apply(DeviceMemoryReported(kernel, replica, held))

    @rule(index=st.integers(0, 5), ok=st.booleans())
    def answer_eviction(self, index: int, ok: bool) -> None:
        if self.outstanding:
            evict = self.outstanding.pop(index % len(self.outstanding))
            self.apply(
                EvictionFinished(evict.kernel_id, evict.replica_id, evict.device_indices, ok, GIB)
            )

    @invariant()
    def committed_vram_fits_each_device(self) -> None:
        for name in self.s.hosts:
            if name in self.shrunk:
                continue
            for device in self.s.device_memory(name):
                assert device.committed <= device.capacity, (name, device)

    @invariant()
    def parked_cells_hold_their_binding_and_wait_for_an_eviction(self) -> None:
        in_flight = {(host, device) for host, device, _ in self.s.evictions}
        for kernel_id, term in self.s.parked:
            view = self.s.kernel(kernel_id)
            assert view is not None and view.binding is not None
            assert view.binding.term == term and term not in view.waiting
            assert any(h == view.binding.host for h, _ in in_flight), (kernel_id, in_flight)

    def answer_every_eviction(self) -> None:
        """Every eviction answered (ok or not, alternately) leaves no cell parked: each was
        started or refused."""
        for round_ in range(200):
            if not self.outstanding:
                break
            evict = self.outstanding.pop(0)
            ok = round_ % 2 == 0
            self.apply(
                EvictionFinished(evict.kernel_id, evict.replica_id, evict.device_indices, ok)
            )
        assert not self.outstanding
        assert self.s.parked == ()
        assert self.s.evictions == ()


class VramMachine(VramChecks, SchedulerMachine):
    """``test_scheduler``'s machine (every scheduler event) with GPU memory in the mix."""

    def teardown(self) -> None:
        self.answer_every_eviction()
        super().teardown()


class FocusedVramMachine(VramChecks, RuleBasedStateMachine):
    """Fewer kinds of events, so that cells, memory and evictions meet more often."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(SchedulerConfig(max_subscription_ratio=4.0))
        self.shrunk: set[str] = set()
        self.term = 0
        self.cells: dict[str, list[int]] = {}

    @rule(kernel=st.sampled_from(KERNELS), prefer=st.integers(0, 3))
    def execute(self, kernel: str, prefer: int) -> None:
        self.term += 1
        view = self.s.kernel(kernel)
        replicas = view.replicas if view else ()
        preferred = replicas[prefer][0] if prefer < len(replicas) else None
        self.cells.setdefault(kernel, []).append(self.term)
        self.apply(ExecutionRequested(kernel, self.term, preferred))

    @rule(kernel=st.sampled_from(KERNELS), which=st.integers(0, 3), cancel=st.booleans())
    def answered_or_interrupted(self, kernel: str, which: int, cancel: bool) -> None:
        terms = self.cells.get(kernel)
        if terms:
            term = terms[which % len(terms)]
            self.apply((ExecutionCancelled if cancel else ExecutionFinished)(kernel, term))

    @rule(kernel=st.sampled_from(KERNELS), index=st.integers(0, 2))
    def replica_lost_and_replaced(self, kernel: str, index: int) -> None:
        view = self.s.kernel(kernel)
        if view and view.replicas:
            self.apply(ReplicaStopped(kernel, view.replicas[index % len(view.replicas)][0]))
            for action in self.apply(ReplicaRequested(kernel)):
                if isinstance(action, PlaceReplicas):
                    for replica_id, _ in action.replicas:
                        self.apply(ReplicaReady(kernel, replica_id))

    @rule(name=st.sampled_from(HOSTS), gpus=st.integers(1, 3), remove=st.booleans())
    def host_comes_or_goes(self, name: str, gpus: int, remove: bool) -> None:
        if remove:
            self.apply(HostRemoved(name))
            self.shrunk.discard(name)
        else:
            if name in self.s.hosts:
                self.shrunk.add(name)
            self.apply(HostAdded(name, Resources(gpus, 8000, 8192, 16.0 * gpus)))

    @rule(host=st.sampled_from(HOSTS), release=st.booleans())
    def job(self, host: str, release: bool) -> None:
        if release:
            self.apply(JobGpusReleased(f"job-{host}"))
            return
        view = self.s.host(host)
        if view is not None and view.free_devices:
            self.apply(JobGpusRequested(f"job-{host}", host, (view.free_devices[0],)))

    @rule(kernel=st.sampled_from(KERNELS), gpus=st.integers(0, 2), replicas=st.sampled_from([1, 3]))
    def kernel_restarts(self, kernel: str, gpus: int, replicas: int) -> None:
        self.apply(KernelStopped(kernel))
        self.cells.pop(kernel, None)
        request = Resources(gpus, 500, 1024, 6.0 * gpus)
        self.apply(KernelRequested(kernel, request, replicas, "notebookos"))

    @invariant()
    def accounting_is_sound(self) -> None:
        check_accounting(self.s, self.shrunk)

    def teardown(self) -> None:
        self.answer_every_eviction()
        for kernel in list(self.s.kernels):
            self.apply(KernelStopped(kernel))
        assert self.s.kernels == {} and self.s.waiting == ()
        for host in self.s.hosts.values():
            assert host.pending.gpus == sum(len(d) for _, d in host.jobs) and host.bound == ()


MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVramMachine = VramMachine.TestCase
TestVramMachine.settings = settings(MACHINE_SETTINGS, max_examples=100)
TestFocusedVramMachine = FocusedVramMachine.TestCase
TestFocusedVramMachine.settings = MACHINE_SETTINGS
