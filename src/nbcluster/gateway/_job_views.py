"""Read-only views of the batch jobs and their workers, computed from the job manager's jobs
and the host registry; pure, no I/O.

The job manager (``_jobs``) calls them: :func:`matching_jobs` for its ``list_jobs()``,
:func:`worker_health` and :func:`job_statistics` for its ``workers()`` and ``statistics()``
(the jobs API and the cluster overview), :func:`worker_capacities` each time it assigns queued
jobs to workers.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ..jobs import Job, WorkerCapacity
from ..scheduling import HostView
from ._hosts import HostRegistry

__all__ = ["job_statistics", "matching_jobs", "worker_capacities", "worker_health"]


def matching_jobs(
    jobs: Iterable[Job],
    status: str | None = None,
    queue: str | None = None,
    owner: str | None = None,
    kernel_id: str | None = None,
) -> list[Job]:
    """The jobs with this status, queue, owner and kernel (None: any), oldest first."""
    found = [
        job
        for job in jobs
        if (status is None or job.status == status)
        and (queue is None or job.spec.queue_name == queue)
        and (owner is None or job.spec.owner == owner)
        and (kernel_id is None or job.spec.kernel_id == kernel_id)
    ]
    return sorted(found, key=lambda j: j.created)


def worker_health(hosts: HostRegistry, jobs: Iterable[Job]) -> list[dict[str, Any]]:
    """Each worker's health, by name: a worker is healthy while it heartbeats (its record
    expires after the host-lost timeout of silence)."""
    now = time.monotonic()
    running = Counter(job.worker for job in jobs if job.status == "running")
    return [
        {
            "name": h.name,
            "healthy": h.state == "connected",
            "state": h.state,
            "seconds_since_heartbeat": round(now - h.last_seen, 3),
            "running_jobs": running.get(h.name, 0),
            "cpus": h.resources.cpus,
            "memory_mb": h.resources.memory_mb,
            "gpus": len(h.resources.gpus),
            "pool": h.resources.pool,
        }
        for h in sorted(hosts.hosts.values(), key=lambda h: h.name)
    ]


def job_statistics(hosts: HostRegistry, jobs: Iterable[Job]) -> dict[str, Any]:
    """Jobs by status, queued jobs by queue, and healthy workers of all."""
    jobs = list(jobs)
    by_status = Counter(job.status for job in jobs)
    queued = Counter(job.spec.queue_name for job in jobs if job.status == "queued")
    return {
        "jobs": dict(by_status),
        "queued": {"cpu": queued.get("cpu", 0), "gpu": queued.get("gpu", 0)},
        "workers": {
            "healthy": sum(1 for h in hosts.hosts.values() if h.state == "connected"),
            "total": len(hosts.hosts),
        },
    }


def worker_capacities(
    hosts: HostRegistry, views: Mapping[str, HostView], jobs: Iterable[Job]
) -> list[WorkerCapacity]:
    """What each connected, undrained worker has left for jobs: its CPUs and memory less what
    its running jobs take, and the GPUs the scheduler (``views``) has free on it."""
    used_cpus: dict[str, float] = defaultdict(float)
    used_mem: dict[str, int] = defaultdict(int)
    for job in jobs:
        if job.status == "running" and job.worker is not None:
            used_cpus[job.worker] += job.spec.resources.cpus
            used_mem[job.worker] += job.spec.resources.memory_mb
    capacities = []
    for host in hosts.connected():
        view = views.get(host.name)
        if view is not None and view.draining:
            continue  # drained (or shrunk below its bindings): no new job starts there
        free = view.free_devices if view is not None else []
        capacities.append(
            WorkerCapacity(
                host.name,
                host.resources.cpus - used_cpus[host.name],
                host.resources.memory_mb - used_mem[host.name],
                free,
                host.resources.pool,
            )
        )
    return capacities
