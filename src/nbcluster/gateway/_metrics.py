"""Prometheus metrics of the gateway, in a registry of its own (several gateways may share a
process in tests). Gauges of hosts, kernels and replicas are computed at scrape time from the
live registries rather than kept in step by hand.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._driver import SchedulerDriver
    from ._hosts import HostRegistry
    from ._kernel import GatewayKernel

__all__ = ["GatewayMetrics"]


class _ClusterCollector(Collector):
    def __init__(self, hosts: HostRegistry, kernels: Callable[[], Iterable[GatewayKernel]]) -> None:
        self._hosts = hosts
        self._kernels = kernels

    def collect(self) -> Iterator[Metric]:
        hosts = GaugeMetricFamily(
            "nbcluster_hosts", "Hosts known to the gateway, by state.", labels=["state"]
        )
        for host_state, n in Tally(h.state for h in self._hosts.hosts.values()).items():
            hosts.add_metric([host_state], n)
        yield hosts
        cpus = GaugeMetricFamily("nbcluster_host_cpus", "CPUs a host reports.", labels=["host"])
        mem = GaugeMetricFamily(
            "nbcluster_host_memory_bytes", "Memory a host reports.", labels=["host"]
        )
        gpus = GaugeMetricFamily("nbcluster_host_gpus", "GPUs a host reports.", labels=["host"])
        for h in self._hosts.hosts.values():
            cpus.add_metric([h.name], h.resources.cpus)
            mem.add_metric([h.name], h.resources.memory_mb * 2**20)
            gpus.add_metric([h.name], len(h.resources.gpus))
        yield from (cpus, mem, gpus)
        kernels = list(self._kernels())
        k_family = GaugeMetricFamily(
            "nbcluster_kernels", "Kernels by execution state.", labels=["state"]
        )
        for kernel_state, n in Tally(k.execution_state for k in kernels).items():
            k_family.add_metric([kernel_state], n)
        yield k_family
        degraded = GaugeMetricFamily(
            "nbcluster_kernels_degraded",
            "Replicated kernels running with fewer replicas than configured (a replacement is "
            "being started, retried or waits for a host).",
        )
        degraded.add_metric([], sum(1 for k in kernels if k.degraded))
        yield degraded
        r_family = GaugeMetricFamily(
            "nbcluster_replicas", "Kernel replicas by state.", labels=["state"]
        )
        for replica_state, n in Tally(r.state for k in kernels for r in k.record.replicas).items():
            r_family.add_metric([replica_state], n)
        yield r_family
        c_family = GaugeMetricFamily(
            "nbcluster_client_connections", "Open websocket connections to kernels."
        )
        c_family.add_metric([], sum(len(k.clients) for k in kernels))
        yield c_family


class _SchedulerCollector(Collector):
    """GPU accounting per host and the cluster's waiting cells, from the scheduler's views."""

    def __init__(self, scheduling: SchedulerDriver) -> None:
        self._scheduling = scheduling

    def collect(self) -> Iterator[Metric]:
        gpus = GaugeMetricFamily(
            "nbcluster_host_gpu_state",
            "GPUs of a host by state: idle (not bound), committed (bound to an executing "
            "replica or reserved), pending (claimed by replicas placed here; may exceed the "
            "host's GPUs: oversubscription).",
            labels=["host", "state"],
        )
        ratio = GaugeMetricFamily(
            "nbcluster_host_subscription_ratio",
            "Largest per-resource pending / capacity / replicas-per-kernel of a host.",
            labels=["host"],
        )
        draining = GaugeMetricFamily(
            "nbcluster_host_draining",
            "1 when a host is draining (an operator drained it, or it shrank below its bindings).",
            labels=["host"],
        )
        for view in self._scheduling.host_views().values():
            gpus.add_metric([view.name, "idle"], view.idle_gpus)
            gpus.add_metric([view.name, "committed"], view.committed_gpus)
            gpus.add_metric([view.name, "pending"], view.pending.gpus)
            ratio.add_metric([view.name], view.subscription_ratio)
            draining.add_metric([view.name], 1 if view.draining else 0)
        yield from (gpus, ratio, draining)
        vram = GaugeMetricFamily(
            "nbcluster_host_gpu_memory_bytes",
            "Memory of each GPU of a host: capacity, committed (the share of the cell bound "
            "there: KERNEL_VRAM_GB / its GPUs) and held (what replicas keep there between "
            "cells; evicted when another cell needs the device).",
            labels=["host", "device", "state"],
        )
        for name in self._scheduling.host_views():
            for device in self._scheduling.device_memory(name):
                index = str(device.device)
                vram.add_metric([name, index, "capacity"], device.capacity)
                vram.add_metric([name, index, "committed"], device.committed)
                vram.add_metric([name, index, "held"], device.held_bytes)
        yield vram
        parked = GaugeMetricFamily(
            "nbcluster_cells_waiting_for_eviction",
            "Cells bound to GPUs whose memory another replica is moving away.",
        )
        parked.add_metric([], len(self._scheduling.parked))
        yield parked
        summary = self._scheduling.summary()
        waiting = GaugeMetricFamily(
            "nbcluster_cells_waiting_for_gpus", "Cells queued until GPUs are free."
        )
        waiting.add_metric([], summary.waiting_cells)
        yield waiting
        capacity = GaugeMetricFamily(
            "nbcluster_cluster_gpus", "GPUs in the cluster by state.", labels=["state"]
        )
        capacity.add_metric(["total"], summary.gpu_capacity)
        capacity.add_metric(["committed"], summary.committed_gpus)
        capacity.add_metric(["pending"], summary.pending_gpus)
        yield capacity


class GatewayMetrics:
    """Created once per gateway; the router and API handlers record into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "nbcluster_messages_routed",
            "Jupyter messages routed by the gateway, by channel and direction (in: client to kernel).",
            ["channel", "direction"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "nbcluster_messages_rejected",
            "Messages or frames rejected as malformed or badly signed, by source.",
            ["source"],
            registry=self.registry,
        )
        self.state_refused = Counter(
            "nbcluster_state_refused",
            "Stored state objects (checkpoints, log entries) a restore refused as forged, "
            "altered or unsigned.",
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "nbcluster_http_request_duration_seconds",
            "Latency of HTTP API requests.",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.kernel_start = Histogram(
            "nbcluster_kernel_start_seconds",
            "Time from a kernel start request to all its replicas ready.",
            registry=self.registry,
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
        )
        self.replacements = Histogram(
            "nbcluster_replica_replacement_seconds",
            "Time to start a replacement replica and have it join its group and catch up.",
            registry=self.registry,
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30),
        )
        self.replacement_failures = Counter(
            "nbcluster_replica_replacement_failures",
            "Replacement attempts that failed (each is retried with backoff).",
            registry=self.registry,
        )
        self.restores = Histogram(
            "nbcluster_kernel_restore_seconds",
            "Time to restore a kernel that lost every replica from the object store.",
            registry=self.registry,
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
        )
        self.jobs_submitted = Counter(
            "nbcluster_jobs_submitted",
            "Jobs submitted, by queue and kind (fast, standard).",
            ["queue", "kind"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "nbcluster_jobs_finished",
            "Jobs that ended, by status.",
            ["status"],
            registry=self.registry,
        )
        self.job_subscribers_dropped = Counter(
            "nbcluster_job_subscribers_dropped",
            "Job event subscribers (SSE, followed logs) dropped for falling behind.",
            registry=self.registry,
        )
        self.jobs_requeued = Counter(
            "nbcluster_jobs_requeued",
            "Jobs put back in their queue (worker lost, or a failure retried).",
            registry=self.registry,
        )
        self.job_start_latency = Histogram(
            "nbcluster_job_start_seconds",
            "Time from a job's submission to its process running on a worker.",
            ["kind"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
        )
        self.host_events_refused = Counter(
            "nbcluster_host_events_refused",
            "Events of host daemons dropped, by reason: stale (a job run that is no longer the "
            "job's current attempt), foreign (a replica or job not assigned to that host).",
            ["reason"],
            registry=self.registry,
        )
        self.reclaims = Counter(
            "nbcluster_kernels_reclaimed",
            "Idle kernels whose replicas were released (idle reclamation).",
            registry=self.registry,
        )
        self.hosts_lost = Counter(
            "nbcluster_hosts_lost", "Hosts declared lost.", registry=self.registry
        )
        self.cells_waiting_total = Counter(
            "nbcluster_cells_waited_for_gpus",
            "Cells that had to wait for GPUs (the user was told).",
            registry=self.registry,
        )
        self.gpu_wait = Histogram(
            "nbcluster_gpu_wait_seconds",
            "How long cells waited for GPUs (until they ran or were cancelled).",
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
        )
        self.migrations = Counter(
            "nbcluster_migrations",
            "Replica migrations, by outcome (ok, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "nbcluster_migration_seconds",
            "Time to start a replica on another host, let it catch up and retire the old one.",
            registry=self.registry,
            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60),
        )
        self.evictions = Counter(
            "nbcluster_evictions",
            "Replicas asked to move their GPU memory to the host, by outcome (ok, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.eviction_seconds = Histogram(
            "nbcluster_eviction_seconds",
            "Time from asking a replica to free GPUs to its answer (or the failure).",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.evicted_bytes = Counter(
            "nbcluster_evicted_bytes",
            "GPU memory moved to host memory by evictions.",
            registry=self.registry,
        )
        self.scale_events = Counter(
            "nbcluster_scale_events",
            "Auto-scaling actions, by direction (out, in) and outcome (ok, failed).",
            ["direction", "outcome"],
            registry=self.registry,
        )
        self._routed: dict[tuple[str, str], Callable[[], None]] = {}

    def watch(
        self,
        hosts: HostRegistry,
        kernels: Callable[[], Iterable[GatewayKernel]],
        scheduling: SchedulerDriver | None = None,
    ) -> None:
        self.registry.register(_ClusterCollector(hosts, kernels))
        if scheduling is not None:
            self.registry.register(_SchedulerCollector(scheduling))

    def routed(self, channel: str, direction: str) -> None:
        inc = self._routed.get((channel, direction))
        if inc is None:
            inc = self._routed[(channel, direction)] = self.messages.labels(channel, direction).inc
        inc()

    def reject(self, source: str, reason: str) -> None:
        self.rejected.labels(source).inc()
