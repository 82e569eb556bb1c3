"""Batch jobs in the pure scheduler: ``JobGpusRequested`` commits free devices to a job (no
pseudo-kernel), ``JobGpusReleased`` frees them for waiting cells first."""

from __future__ import annotations

from nbcluster.scheduling import (
    BindGpus,
    BindJobGpus,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    HostResourcesChanged,
    JobGpusRefused,
    JobGpusReleased,
    JobGpusRequested,
    KernelRequested,
    PlaceReplicas,
    Resources,
    Scheduler,
    WaitForGpus,
)

TWO_GPUS = Resources(gpus=2, millicpus=8000, memory_mb=16384, vram_gb=32.0)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)


def two_gpu_host() -> Scheduler:
    s = Scheduler()
    s.handle(HostAdded("h1", TWO_GPUS))
    return s


def test_a_job_holds_the_free_devices_it_asks_for_until_it_releases_them() -> None:
    s = two_gpu_host()
    assert s.handle(JobGpusRequested("j1", "h1", (1,))) == [BindJobGpus("j1", "h1", (1,))]
    view = s.hosts["h1"]
    assert view.jobs == (("j1", (1,)),)
    assert view.bound == ()  # no kernel holds anything
    assert view.free_devices == [0]
    assert (view.committed_gpus, view.idle_gpus, view.pending.gpus) == (1, 1, 1)
    summary = s.summary()
    assert (summary.committed_gpus, summary.pending_gpus) == (1, 1)
    assert summary.idle_hosts == ()  # a host running a job is not idle
    assert s.kernels == {}  # no pseudo-kernel
    assert s.handle(JobGpusReleased("j1")) == []
    view = s.hosts["h1"]
    assert view.jobs == () and view.free_devices == [0, 1] and view.pending.is_zero()
    assert s.summary().idle_hosts == ("h1",)


def test_a_job_is_refused_devices_that_are_not_all_free() -> None:
    s = two_gpu_host()
    s.handle(JobGpusRequested("j1", "h1", (0,)))
    for job, host, devices, says in [
        ("j2", "h1", (0,), "GPUs [0] of host h1 are not all free"),
        ("j2", "h1", (1, 5), "GPUs [1, 5] of host h1 are not all free"),
        ("j2", "h1", (1, 1), "are not all free"),
        ("j2", "h1", (), "are not all free"),
        ("j2", "h9", (0,), "no host named h9"),
        ("j1", "h1", (1,), "job j1 already holds GPUs on h1"),
    ]:
        [refused] = s.handle(JobGpusRequested(job, host, devices))
        assert isinstance(refused, JobGpusRefused) and refused.job_id == job
        assert says in refused.reason
    assert s.hosts["h1"].jobs == (("j1", (0,)),)  # nothing changed
    assert s.hosts["h1"].free_devices == [1]


def test_a_job_never_gets_a_device_bound_to_a_cell_and_a_cell_never_gets_a_jobs() -> None:
    s = two_gpu_host()
    [place] = s.handle(KernelRequested("k", ONE_GPU, 1, "batch"))
    assert isinstance(place, PlaceReplicas)
    [bind] = s.handle(ExecutionRequested("k", 1))
    assert isinstance(bind, BindGpus) and bind.device_indices == (0,)
    [refused] = s.handle(JobGpusRequested("j1", "h1", (0,)))
    assert isinstance(refused, JobGpusRefused)
    assert s.handle(JobGpusRequested("j1", "h1", (1,))) == [BindJobGpus("j1", "h1", (1,))]
    assert s.hosts["h1"].free_devices == []


def test_released_job_gpus_go_to_the_cell_that_waited_for_them() -> None:
    s = Scheduler()
    s.handle(HostAdded("h1", Resources(gpus=1, millicpus=8000, memory_mb=16384, vram_gb=16.0)))
    s.handle(JobGpusRequested("j1", "h1", (0,)))
    s.handle(KernelRequested("k", ONE_GPU, 1, "batch"))
    [wait, *_] = s.handle(ExecutionRequested("k", 1))
    assert isinstance(wait, WaitForGpus)
    assert s.waiting == (("k", 1),)
    [bind] = s.handle(JobGpusReleased("j1"))
    assert isinstance(bind, BindGpus) and (bind.term, bind.device_indices) == (1, (0,))
    assert s.waiting == ()


def test_a_removed_host_forgets_its_jobs_and_a_late_release_is_ignored() -> None:
    s = two_gpu_host()
    s.handle(JobGpusRequested("j1", "h1", (0, 1)))
    s.handle(HostRemoved("h1"))
    assert s.handle(JobGpusReleased("j1")) == []
    s.handle(HostAdded("h1", TWO_GPUS))
    view = s.hosts["h1"]
    assert view.jobs == () and view.free_devices == [0, 1] and view.pending.is_zero()
    # the job may ask again (it was requeued)
    assert s.handle(JobGpusRequested("j1", "h1", (0,))) == [BindJobGpus("j1", "h1", (0,))]


def test_a_host_that_loses_a_jobs_device_drains_until_the_job_ends() -> None:
    s = two_gpu_host()
    s.handle(JobGpusRequested("j1", "h1", (1,)))
    shrunk = Resources(gpus=1, millicpus=8000, memory_mb=16384, vram_gb=16.0)
    s.handle(HostResourcesChanged("h1", shrunk, (0,)))
    assert s.hosts["h1"].draining
    s.handle(JobGpusReleased("j1"))
    assert not s.hosts["h1"].draining
    assert s.hosts["h1"].free_devices == [0]
