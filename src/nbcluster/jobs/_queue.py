"""Which queued jobs start where, as a pure function of the queue and the workers' free
capacity (the gateway's job manager calls :func:`assign_jobs` whenever either changes).

Order: fast jobs first, then oldest first. A job that fits nowhere does not hold up the ones
behind it (back-filling). A worker runs jobs up to its free CPUs, memory and GPUs: CPUs and
memory are counted against what its running jobs asked for, GPUs against the devices no kernel
cell and no job holds (the scheduler's view), so that a GPU is never given to a job and a cell
at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ._model import Job

__all__ = ["WorkerCapacity", "assign_jobs"]


@dataclass(slots=True)
class WorkerCapacity:
    """What one worker (host) can still take."""

    name: str
    cpus: float
    memory_mb: int
    free_gpus: list[int] = field(default_factory=list)
    #: Its host pool: it takes jobs of that pool and jobs that name none.
    pool: str | None = None

    def fits(self, job: Job, gpus_allowed: bool) -> bool:
        if job.spec.pool is not None and job.spec.pool != self.pool:
            return False
        r = job.spec.resources
        if r.gpus and (not gpus_allowed or len(self.free_gpus) < r.gpus):
            return False
        return r.cpus <= self.cpus + 1e-9 and r.memory_mb <= self.memory_mb


def assign_jobs(
    queued: Iterable[Job], workers: list[WorkerCapacity], gpus_allowed: bool = True
) -> list[tuple[Job, str, tuple[int, ...]]]:
    """``(job, worker, gpu devices)`` for each queued job that can start now; ``workers`` is
    updated with what they took. ``gpus_allowed`` False holds GPU jobs back (cells are
    waiting for GPUs and take precedence)."""
    order = sorted(queued, key=lambda j: (not j.spec.fast, j.created, j.id))
    started: list[tuple[Job, str, tuple[int, ...]]] = []
    for job in order:
        fitting = [w for w in workers if w.fits(job, gpus_allowed)]
        if not fitting:
            continue
        # GPU jobs where most GPUs are free, others where most CPU is free.
        if job.spec.resources.gpus:
            worker = max(fitting, key=lambda w: (len(w.free_gpus), w.cpus, w.name))
        else:
            worker = max(fitting, key=lambda w: (w.cpus, -len(w.free_gpus), w.name))
        r = job.spec.resources
        devices = tuple(sorted(worker.free_gpus)[: r.gpus])
        worker.free_gpus = [d for d in worker.free_gpus if d not in devices]
        worker.cpus -= r.cpus
        worker.memory_mb -= r.memory_mb
        started.append((job, worker.name, devices))
    return started
