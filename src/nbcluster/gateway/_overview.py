"""What the dashboard and ``nbcluster top`` draw, in one answer: the hosts and their GPUs, the
kernels and their replicas, jobs and queues, for one caller (a user sees their own kernels
and jobs and no hosts; an admin everything). Served by ``GET /api/cluster/overview`` and sent
on the event stream (``?overview=SECONDS``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..identity import Principal
from ..notices import ClusterOverview, GpuTotals

if TYPE_CHECKING:
    from ._app import Gateway

__all__ = ["build_overview"]

#: Jobs sent per overview: the newest first (the jobs API pages the rest).
MAX_JOBS = 50


def build_overview(gateway: Gateway, principal: Principal) -> ClusterOverview:
    """Called by the overview endpoint and the event stream, on the gateway's loop."""
    kernels = [gateway.kernel_summary(k) for k in gateway.access.kernels(principal)]
    jobs = gateway.access.jobs(principal, gateway.jobs.list_jobs())
    jobs.sort(key=lambda j: j.created, reverse=True)
    overview = ClusterOverview(
        time=datetime.now(UTC),
        user=principal.user,
        admin=principal.is_admin,
        last_seq=gateway.notifier.ring.last_seq,
        kernels=kernels,
        jobs=jobs[:MAX_JOBS],
        queues=gateway.jobs.statistics()["queued"],
    )
    if principal.is_admin:
        hosts = gateway.host_summaries()
        summary = gateway.scheduling.summary()
        capacity = summary.gpu_capacity
        # Each host's ratio is over its own GPUs: weighted by them, the cluster's.
        subscribed = sum((h.get("subscription_ratio") or 0) * len(h["gpus"]) for h in hosts)
        overview.totals = GpuTotals(
            hosts=summary.hosts,
            gpu_capacity=capacity,
            committed_gpus=summary.committed_gpus,
            pending_gpus=summary.pending_gpus,
            waiting_cells=summary.waiting_cells,
            subscription_ratio=round(subscribed / capacity, 3) if capacity else 0.0,
        )
        overview.hosts = hosts
        overview.workers = gateway.jobs.workers()
    return overview
