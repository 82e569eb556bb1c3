"""A user's GPU quota bounds the GPUs their cells and jobs hold at once: a cell past it waits
(saying why, asking for no host) until the user's own work releases GPUs."""

from __future__ import annotations

from nbcluster.scheduling import (
    BindGpus,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    JobGpusReleased,
    JobGpusRequested,
    KernelRequested,
    PlaceReplicas,
    ReleaseGpus,
    Resources,
    ScaleOut,
    Scheduler,
    UserQuotaSet,
    WaitForGpus,
)

HOST = Resources(gpus=4, millicpus=64_000, memory_mb=128_000)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)


def scheduler_with(kernels: dict[str, str], quota: int | None = 1) -> Scheduler:
    """Two 4-GPU hosts; one-replica kernels ``id -> owner``; alice's quota."""
    s = Scheduler()
    for name in ("h1", "h2"):
        s.handle(HostAdded(name, HOST))
    for kernel_id, owner in kernels.items():
        [placed] = s.handle(KernelRequested(kernel_id, ONE_GPU, 1, owner=owner))
        assert isinstance(placed, PlaceReplicas)
    s.handle(UserQuotaSet("alice", quota))
    return s


def test_a_cell_past_the_quota_waits_for_the_users_own_cell() -> None:
    s = scheduler_with({"a1": "alice", "a2": "alice", "b1": "bob"})
    [bound] = s.handle(ExecutionRequested("a1", 1))
    assert isinstance(bound, BindGpus)
    actions = s.handle(ExecutionRequested("a2", 1))
    # It waits, says why, and asks for no host: more hosts would not help.
    assert [type(a) for a in actions] == [WaitForGpus]
    wait = actions[0]
    assert isinstance(wait, WaitForGpus) and "quota" in wait.reason and "alice" in wait.reason
    assert not any(isinstance(a, ScaleOut) for a in actions)
    # Bob has no quota: his cell runs although GPUs are short for alice.
    assert isinstance(s.handle(ExecutionRequested("b1", 1))[0], BindGpus)
    # Alice's first cell ends: her waiting cell gets the GPU.
    released = s.handle(ExecutionFinished("a1", 1))
    assert isinstance(released[0], ReleaseGpus)
    assert any(isinstance(a, BindGpus) and a.kernel_id == "a2" for a in released)


def test_a_users_job_counts_against_their_quota() -> None:
    s = scheduler_with({"a1": "alice"})
    s.handle(JobGpusRequested("j1", "h2", (0,), owner="alice"))
    [wait] = s.handle(ExecutionRequested("a1", 1))
    assert isinstance(wait, WaitForGpus) and "quota" in wait.reason
    after = s.handle(JobGpusReleased("j1"))
    assert any(isinstance(a, BindGpus) and a.kernel_id == "a1" for a in after)


def test_raising_or_lifting_the_quota_lets_waiting_cells_run() -> None:
    s = scheduler_with({"a1": "alice", "a2": "alice"})
    s.handle(ExecutionRequested("a1", 1))
    assert isinstance(s.handle(ExecutionRequested("a2", 1))[0], WaitForGpus)
    lifted = s.handle(UserQuotaSet("alice", None))
    assert any(isinstance(a, BindGpus) and a.kernel_id == "a2" for a in lifted)


def test_cpu_cells_ignore_the_quota() -> None:
    s = scheduler_with({"a1": "alice", "a2": "alice"}, quota=0)
    [bound] = s.handle(ExecutionRequested("a1", 1, gpus=0))
    assert isinstance(bound, BindGpus) and bound.device_indices == ()
    [wait] = s.handle(ExecutionRequested("a2", 1))
    assert isinstance(wait, WaitForGpus) and "holds 0 of their 0 GPU(s)" in wait.reason
