"""What one policy's replay gives: the summary (a pydantic model: it is written to JSON and
CSV), the GPUs/hosts-over-time series and every cell's start delay (for the CDF plot)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

__all__ = ["PERCENTILES", "PolicyOutcome", "PolicySummary", "Timeline", "percentile"]

#: The delay percentiles kept in the summary (for a CDF without every delay).
PERCENTILES = tuple(range(101))


class PolicySummary(BaseModel):
    """One policy's figures. GPU-hours: *held* is the integral of GPUs committed (bound to a
    cell, or to a kernel for its life), *used* what the cells that ran needed while they ran,
    *provisioned* the integral of the cluster's GPUs. A cell's start delay runs from when it
    could have started (sent, and its kernel's previous cell done) to when it started."""

    model_config = ConfigDict(frozen=True)

    policy: str
    sessions: int
    sessions_refused: int
    cells: int
    cells_run: int
    cells_refused: int
    cells_unfinished: int
    gpu_hours_held: float
    gpu_hours_used: float
    gpu_hours_provisioned: float
    delay_p50_s: float
    delay_p95_s: float
    delay_p99_s: float
    delay_max_s: float
    cells_waited: int
    wait_hours: float
    wait_mean_s: float
    migrations: int
    reclaims: int
    hosts_min: int
    hosts_max: int
    hosts_mean: float
    hosts_started: int
    hosts_stopped: int
    scheduler_events: int
    simulated_hours: float
    replay_seconds: float
    events_per_second: float
    #: The delay at each whole percentile, 0 to 100 (seconds).
    delay_percentiles_s: list[float]


@dataclass(frozen=True, slots=True)
class Timeline:
    """Per bucket of ``bucket_seconds`` from ``start``: the mean and peak GPUs committed and
    the most hosts."""

    start: float
    bucket_seconds: float
    committed_mean: tuple[float, ...]
    committed_max: tuple[int, ...]
    hosts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    summary: PolicySummary
    timeline: Timeline
    #: Every started cell's delay, sorted (seconds; 8 bytes each).
    delays: Sequence[float]


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    if q <= 0:
        return ordered[0]
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]
