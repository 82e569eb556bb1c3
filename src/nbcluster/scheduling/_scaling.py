"""Auto-scaling decisions (NotebookOS ``ValidateCapacity``), as a pure function.

The gateway calls :func:`scaling_decision` every scaling interval with
``Scheduler.summary()`` and carries out the returned ``ScaleOut``/``ScaleIn`` through its
host provider. Reactive scale-out on a failed placement comes from the scheduler itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._actions import ScaleIn, ScaleOut
from ._views import ClusterSummary

__all__ = ["ScalingConfig", "scaling_decision"]


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """NotebookOS defaults (``gateway_static.yaml``)."""

    scaling_factor: float = 1.10
    scaling_limit: float = 1.15
    scale_in_per_round: int = 2
    buffer_hosts: int = 3
    min_hosts: int = 12
    max_hosts: int = 32
    gpus_per_host: int = 8
    replicas_per_kernel: int = 3

    def __post_init__(self) -> None:
        if self.min_hosts < 0 or self.max_hosts < self.min_hosts:
            raise ValueError(
                f"need 0 ≤ min_hosts ≤ max_hosts, got {self.min_hosts}, {self.max_hosts}"
            )
        if self.gpus_per_host < 1:
            raise ValueError(f"gpus_per_host must be ≥ 1, got {self.gpus_per_host}")


def scaling_decision(summary: ClusterSummary, config: ScalingConfig) -> ScaleOut | ScaleIn | None:
    """Scale out to ``ceil(committed * factor / gpus_per_host)`` hosts (at least
    ``min_hosts + buffer_hosts``, at most ``max_hosts``) when the committed GPUs * factor
    exceed capacity or the cluster is below that floor; otherwise release up to
    ``scale_in_per_round`` idle hosts while the cluster is larger than
    ``ceil(committed * limit / gpus_per_host)`` (same floor), never below ``min_hosts``.
    """
    load = summary.committed_gpus
    floor = min(config.min_hosts + config.buffer_hosts, config.max_hosts)
    wanted = load * config.scaling_factor
    if wanted > summary.gpu_capacity or summary.hosts < floor:
        target = min(max(math.ceil(wanted / config.gpus_per_host), floor), config.max_hosts)
        if target > summary.hosts:
            return ScaleOut(
                target - summary.hosts,
                f"{load} committed GPUs * {config.scaling_factor} need {target} hosts; "
                f"the cluster has {summary.hosts}",
            )
        return None
    limit = max(math.ceil(load * config.scaling_limit / config.gpus_per_host), floor)
    if config.min_hosts < config.replicas_per_kernel:
        limit = max(limit, config.min_hosts + config.replicas_per_kernel)
    limit = max(min(limit, config.max_hosts), config.min_hosts)
    count = min(summary.hosts - limit, config.scale_in_per_round, len(summary.idle_hosts))
    if count > 0:
        return ScaleIn(
            summary.idle_hosts[:count],
            f"{summary.hosts} hosts exceed the {limit} that {load} committed GPUs * "
            f"{config.scaling_limit} need",
        )
    return None
