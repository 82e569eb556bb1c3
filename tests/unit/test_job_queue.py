"""Which queued jobs start where (pure): order, capacity, GPUs, back-filling."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nbcluster.jobs import Job, JobSpec, WorkerCapacity, assign_jobs


def job(n: int, gpus: int = 0, cpus: float = 1.0, fast: bool = False, memory_mb: int = 100) -> Job:
    spec = JobSpec.model_validate(
        {
            "command": ["true"],
            "fast": fast,
            "resources": {"gpus": gpus, "cpus": cpus, "memory_mb": memory_mb},
        }
    )
    return Job(id=f"j{n:03d}", spec=spec, created=float(n))


def test_fast_jobs_first_then_oldest() -> None:
    workers = [WorkerCapacity("w", cpus=2, memory_mb=10_000)]
    started = assign_jobs([job(1), job(2), job(3, fast=True)], workers)
    assert [j.id for j, _, _ in started] == ["j003", "j001"]
    assert workers[0].cpus == 0


def test_gpu_jobs_take_distinct_free_devices_and_never_more_than_free() -> None:
    workers = [
        WorkerCapacity("a", cpus=8, memory_mb=10_000, free_gpus=[0, 1]),
        WorkerCapacity("b", cpus=8, memory_mb=10_000, free_gpus=[3]),
    ]
    started = assign_jobs([job(n, gpus=1) for n in range(5)], workers)
    assert len(started) == 3
    taken = [(w, d) for _, w, devices in started for d in devices]
    assert sorted(taken) == [("a", 0), ("a", 1), ("b", 3)]


def test_a_big_job_does_not_block_smaller_ones_behind_it() -> None:
    workers = [WorkerCapacity("w", cpus=2, memory_mb=10_000)]
    started = assign_jobs([job(1, cpus=4), job(2, cpus=1)], workers)
    assert [j.id for j, _, _ in started] == ["j002"]


def test_gpu_jobs_wait_while_cells_wait() -> None:
    workers = [WorkerCapacity("w", cpus=8, memory_mb=10_000, free_gpus=[0])]
    started = assign_jobs([job(1, gpus=1), job(2)], workers, gpus_allowed=False)
    assert [j.id for j, _, _ in started] == ["j002"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.5, 1.0, 2.0])), max_size=30),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=4),
)
def test_capacity_is_never_exceeded(
    jobs: list[tuple[int, float]], hosts: list[tuple[int, int]]
) -> None:
    workers = [
        WorkerCapacity(f"w{i}", cpus=c, memory_mb=1000, free_gpus=list(range(g)))
        for i, (g, c) in enumerate(hosts)
    ]
    limits = {w.name: (w.cpus, len(w.free_gpus)) for w in workers}
    started = assign_jobs([job(n, g, c) for n, (g, c) in enumerate(jobs)], workers)
    for name, (cpus, gpus) in limits.items():
        mine = [(j, d) for j, w, d in started if w == name]
        assert sum(j.spec.resources.cpus for j, _ in mine) <= cpus + 1e-9
        devices = [x for _, d in mine for x in d]
        assert len(devices) == len(set(devices)) <= gpus


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"command": "ls"}, "command"),
        ({"command": []}, "command"),
        ({"source": "1", "command": ["x"]}, "exactly one"),
        ({"command": ["x"], "env": {"1BAD": "x"}}, "not a valid environment variable"),
        ({"command": ["x"], "outputs": ["../escape"]}, "relative path"),
        ({"command": ["x"], "queue": "cpu", "resources": {"gpus": 1}}, "cpu queue"),
        ({"command": ["x"], "workers": 2}, "workers"),
        ({"command": ["x"], "fast": True, "inputs": {"a": "k"}}, "inline_inputs only"),
        ({"command": ["x"], "surprise": 1}, "surprise"),
    ],
)
def test_bad_specs_name_the_problem(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(spec)
    assert field in str(caught.value)
