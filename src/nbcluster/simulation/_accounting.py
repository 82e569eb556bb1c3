"""What a replay measures, and the :class:`~._results.PolicyOutcome` made of it.

The engine (``_engine``) owns one :class:`Accounting` per replay and tells it, as simulated
time passes, what the cluster holds: GPUs committed to kernels (``bind``/``release``), hosts
(``host_added``/``host_removed``), each started cell's delay (``cell_started``), and the counts
of what happened (events, migrations, reclaims, refusals, hosts started and stopped: plain
attributes it increments). ``advance`` integrates GPU- and host-seconds over time and feeds
the per-bucket :class:`TimelineBuckets`; ``outcome`` makes the summary at the end.
"""

from __future__ import annotations

from array import array

from ._results import PERCENTILES, PolicyOutcome, PolicySummary, Timeline, percentile
from ._workload import Workload

__all__ = ["Accounting", "TimelineBuckets"]


class TimelineBuckets:
    """Mean and peak committed GPUs and peak hosts per bucket of simulated time."""

    def __init__(self, start: float, width: float) -> None:
        self.start = start
        self.width = width
        self.committed_seconds: list[float] = []
        self.committed_max: list[int] = []
        self.hosts: list[int] = []

    def _bucket(self, index: int) -> None:
        while len(self.hosts) <= index:
            self.committed_seconds.append(0.0)
            self.committed_max.append(0)
            self.hosts.append(0)

    def add(self, t0: float, t1: float, committed: int, hosts: int) -> None:
        """The state held from ``t0`` to ``t1`` (also a zero-length instant: peaks count)."""
        first = max(int((t0 - self.start) // self.width), 0)
        last = max(int((t1 - self.start) // self.width), 0)
        self._bucket(last)
        for index in range(first, last + 1):
            lo = max(t0, self.start + index * self.width)
            hi = min(t1, self.start + (index + 1) * self.width)
            if hi > lo:
                self.committed_seconds[index] += committed * (hi - lo)
            if committed > self.committed_max[index]:
                self.committed_max[index] = committed
            if hosts > self.hosts[index]:
                self.hosts[index] = hosts

    def frozen(self) -> Timeline:
        return Timeline(
            self.start,
            self.width,
            tuple(s / self.width for s in self.committed_seconds),
            tuple(self.committed_max),
            tuple(self.hosts),
        )


class Accounting:
    """One replay's measures, from simulated time ``start``, the timeline in buckets of
    ``bucket_width`` seconds."""

    def __init__(self, start: float, bucket_width: float) -> None:
        #: GPUs committed to kernels now, in all and per kernel.
        self.committed = 0
        self.bound: dict[str, int] = {}
        #: GPUs and hosts in the cluster now; the fewest and most hosts so far.
        self.capacity = 0
        self.host_count = 0
        self.hosts_min = 0
        self.hosts_max = 0
        self.gpu_seconds_held = 0.0
        self.gpu_seconds_used = 0.0
        self.gpu_seconds_provisioned = 0.0
        self.host_seconds = 0.0
        #: Every started cell's delay (8 bytes each).
        self.delays = array("d")
        self.events = 0
        self.migrations = 0
        self.reclaims = 0
        self.sessions_refused = 0
        self.cells_refused = 0
        self.hosts_started = 0
        self.hosts_stopped = 0
        self.timeline = TimelineBuckets(start, bucket_width)

    def advance(self, t0: float, t1: float) -> None:
        """What the cluster held from ``t0`` to ``t1`` (``t1 >= t0``)."""
        dt = t1 - t0
        if dt > 0:
            self.gpu_seconds_held += self.committed * dt
            self.gpu_seconds_provisioned += self.capacity * dt
            self.host_seconds += self.host_count * dt
        self.timeline.add(t0, t1, self.committed, self.host_count)

    def bind(self, kernel_id: str, gpus: int) -> None:
        """The kernel holds ``gpus`` GPUs now (instead of what it held)."""
        self.committed += gpus - self.bound.get(kernel_id, 0)
        self.bound[kernel_id] = gpus

    def release(self, kernel_id: str) -> None:
        self.committed -= self.bound.pop(kernel_id, 0)

    def host_added(self, gpus: int) -> None:
        self.host_count += 1
        self.capacity += gpus
        self.hosts_max = max(self.hosts_max, self.host_count)

    def host_removed(self, gpus: int) -> None:
        self.host_count -= 1
        self.capacity -= gpus
        self.hosts_stopped += 1
        self.hosts_min = min(self.hosts_min, self.host_count)

    def cell_started(self, delay: float, gpus: int, duration: float) -> None:
        self.delays.append(delay)
        self.gpu_seconds_used += gpus * duration

    def outcome(
        self, policy: str, workload: Workload, simulated: float, unfinished: int, seconds: float
    ) -> PolicyOutcome:
        """The summary of a replay of ``workload`` under ``policy`` that covered ``simulated``
        seconds, left ``unfinished`` cells and took ``seconds`` of real time."""
        delays = array("d", sorted(self.delays))
        waited_count = sum(1 for d in delays if d > 1e-9)
        waited_total = sum(d for d in delays if d > 1e-9)
        summary = PolicySummary(
            policy=policy,
            sessions=len(workload.sessions),
            sessions_refused=self.sessions_refused,
            cells=workload.cells,
            cells_run=len(delays),
            cells_refused=self.cells_refused,
            cells_unfinished=unfinished,
            gpu_hours_held=self.gpu_seconds_held / 3600,
            gpu_hours_used=self.gpu_seconds_used / 3600,
            gpu_hours_provisioned=self.gpu_seconds_provisioned / 3600,
            delay_p50_s=percentile(delays, 50),
            delay_p95_s=percentile(delays, 95),
            delay_p99_s=percentile(delays, 99),
            delay_max_s=delays[-1] if delays else 0.0,
            cells_waited=waited_count,
            wait_hours=waited_total / 3600,
            wait_mean_s=waited_total / waited_count if waited_count else 0.0,
            migrations=self.migrations,
            reclaims=self.reclaims,
            hosts_min=self.hosts_min,
            hosts_max=self.hosts_max,
            hosts_mean=self.host_seconds / simulated if simulated > 0 else float(self.host_count),
            hosts_started=self.hosts_started,
            hosts_stopped=self.hosts_stopped,
            scheduler_events=self.events,
            simulated_hours=simulated / 3600,
            replay_seconds=seconds,
            events_per_second=self.events / seconds if seconds > 0 else 0.0,
            delay_percentiles_s=[percentile(delays, q) for q in PERCENTILES],
        )
        return PolicyOutcome(summary, self.timeline.frozen(), delays)
