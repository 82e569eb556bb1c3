"""What a replay runs on: the cluster (fixed, auto-scaled, or the recorded one) and the
timings the simulator charges for what takes time in a real gateway.

``nbcluster simulate`` builds these from its options; the engine (``_engine``) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scheduling import Resources, ScalingConfig
from ._workload import RecordedHost

__all__ = ["Cluster", "SimulationSettings", "simulated_host_spec"]


def simulated_host_spec(gpus: int) -> Resources:
    """A simulated host with ``gpus`` GPUs: NotebookOS's host defaults (64 cores, 128 GB),
    40 GB of memory per GPU (the gateway's virtual GPUs)."""
    return Resources(gpus=gpus, millicpus=64_000, memory_mb=128_000, vram_gb=40.0 * gpus)


@dataclass(frozen=True, slots=True)
class Cluster:
    """The hosts a replay starts with and, with ``scaling``, the auto-scaler (the gateway's
    rule, ``scaling_decision``) that starts hosts of ``scaling.gpus_per_host`` GPUs and
    stops idle ones."""

    hosts: tuple[RecordedHost, ...]
    scaling: ScalingConfig | None = None

    @classmethod
    def fixed(cls, count: int, gpus_per_host: int) -> Cluster:
        if count < 1 or gpus_per_host < 0:
            raise ValueError(
                f"need at least 1 host and 0 or more GPUs, got {count} x {gpus_per_host}"
            )
        return cls(tuple(_host(n, gpus_per_host) for n in range(1, count + 1)))

    @classmethod
    def autoscaled(
        cls, min_hosts: int, max_hosts: int, gpus_per_host: int, buffer_hosts: int = 3
    ) -> Cluster:
        """Starts with ``min_hosts + buffer_hosts`` hosts (at most ``max_hosts``): where the
        auto-scaler's first round would take it."""
        scaling = ScalingConfig(
            buffer_hosts=buffer_hosts,
            min_hosts=min_hosts,
            max_hosts=max_hosts,
            gpus_per_host=gpus_per_host,
        )
        if max_hosts < 1:
            raise ValueError(f"max_hosts must be at least 1, got {max_hosts}")
        start = min(min_hosts + buffer_hosts, max_hosts)
        return cls(tuple(_host(n, gpus_per_host) for n in range(1, start + 1)), scaling)

    def describe(self) -> str:
        gpus = sum(h.spec.gpus for h in self.hosts)
        if self.scaling is None:
            return f"{len(self.hosts)} hosts, {gpus} GPUs (fixed)"
        s = self.scaling
        return (
            f"auto-scaled between {s.min_hosts} and {s.max_hosts} hosts of {s.gpus_per_host} "
            f"GPUs (buffer {s.buffer_hosts}; starts with {len(self.hosts)})"
        )


def _host(number: int, gpus: int) -> RecordedHost:
    return RecordedHost(f"host-{number}", simulated_host_spec(gpus))


@dataclass(frozen=True, slots=True)
class SimulationSettings:
    cluster: Cluster = field(default_factory=lambda: Cluster.autoscaled(12, 32, 8))
    #: ``--max-subscription-ratio`` of the gateway.
    max_subscription_ratio: float = 7.0
    #: The subscription ratio's denominator (the gateway's ``--replicas``).
    replicas_per_kernel: int = 3
    #: Replicated kernels idle this long release their replicas (None: never).
    reclaim_idle_after: float | None = None
    #: A cell that needs a migration starts this much later (new replica up, caught up).
    migration_seconds: float = 2.0
    #: A reclaimed kernel's cell waits this long for its kernel to be restored.
    restore_seconds: float = 2.0
    #: A host the auto-scaler starts registers this long after (NotebookOS simulates 15 s).
    host_start_seconds: float = 15.0
    #: Seconds between auto-scaling rounds (NotebookOS: 15).
    scaling_interval: float = 15.0
    #: Points of the GPUs/hosts-over-time series.
    timeline_points: int = 720

    def __post_init__(self) -> None:
        for name in (
            "migration_seconds",
            "restore_seconds",
            "host_start_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.scaling_interval <= 0 or self.timeline_points < 1:
            raise ValueError("scaling_interval must be positive and timeline_points at least 1")
        if self.reclaim_idle_after is not None and self.reclaim_idle_after <= 0:
            raise ValueError(f"reclaim_idle_after must be positive, got {self.reclaim_idle_after}")
