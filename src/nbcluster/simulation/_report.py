"""The results of a replay, written out: a side-by-side table for the terminal (rich), a
JSON report, a CSV row per policy and a CSV of GPUs and hosts over time.

``nbcluster simulate`` calls these after replaying every policy; the JSON report
(:class:`SimulationReport`) is the typed contract for scripts reading ``summary.json``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from rich.table import Table

from ._results import PolicyOutcome, PolicySummary
from ._workload import Workload

__all__ = [
    "SimulationReport",
    "WorkloadSummary",
    "held_ratio",
    "simulation_report",
    "summary_table",
    "write_json",
    "write_summary_csv",
    "write_timeline_csv",
]


class WorkloadSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    trace: str
    trace_format: str
    sessions: int
    cells: int
    span_hours: float
    gpu_hours_needed: float
    notes: list[str]


class SimulationReport(BaseModel):
    """``summary.json``: the workload, the settings (in words) and each policy's figures."""

    model_config = ConfigDict(frozen=True)

    workload: WorkloadSummary
    settings: list[str]
    policies: list[PolicySummary]
    #: ``notebookos`` GPU-hours held over ``reservation``'s, when both ran.
    notebookos_over_reservation: float | None


def held_ratio(outcomes: Sequence[PolicyOutcome], a: str, b: str) -> float | None:
    """GPU-hours held by policy ``a`` over those of ``b`` (None unless both ran)."""
    by_name = {o.summary.policy: o.summary for o in outcomes}
    if a not in by_name or b not in by_name or by_name[b].gpu_hours_held <= 0:
        return None
    return by_name[a].gpu_hours_held / by_name[b].gpu_hours_held


def simulation_report(
    workload: Workload, settings: Sequence[str], outcomes: Sequence[PolicyOutcome]
) -> SimulationReport:
    return SimulationReport(
        workload=WorkloadSummary(
            trace=workload.source,
            trace_format=workload.trace_format,
            sessions=len(workload.sessions),
            cells=workload.cells,
            span_hours=workload.span / 3600,
            gpu_hours_needed=workload.gpu_hours_needed,
            notes=list(workload.notes),
        ),
        settings=list(settings),
        policies=[o.summary for o in outcomes],
        notebookos_over_reservation=held_ratio(outcomes, "notebookos", "reservation"),
    )


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _rows(s: PolicySummary) -> list[tuple[str, str]]:
    run = max(s.cells_run, 1)
    return [
        ("Kernels refused", f"{s.sessions_refused} of {s.sessions}"),
        ("Cells run", f"{s.cells_run} of {s.cells}"),
        ("Cells refused / unfinished", f"{s.cells_refused} / {s.cells_unfinished}"),
        ("GPU-hours held", f"{s.gpu_hours_held:,.1f}"),
        ("GPU-hours used", f"{s.gpu_hours_used:,.1f}"),
        (
            "Held / used",
            f"{s.gpu_hours_held / s.gpu_hours_used:.2f}" if s.gpu_hours_used > 0 else "-",
        ),
        ("GPU-hours provisioned", f"{s.gpu_hours_provisioned:,.1f}"),
        ("Start delay p50", _seconds(s.delay_p50_s)),
        ("Start delay p95", _seconds(s.delay_p95_s)),
        ("Start delay p99", _seconds(s.delay_p99_s)),
        ("Start delay max", _seconds(s.delay_max_s)),
        ("Cells that waited", f"{s.cells_waited} ({100 * s.cells_waited / run:.1f} %)"),
        ("Waiting, mean / total", f"{_seconds(s.wait_mean_s)} / {s.wait_hours:,.1f} h"),
        ("Migrations", str(s.migrations)),
        ("Idle kernels reclaimed", str(s.reclaims)),
        ("Hosts min / mean / max", f"{s.hosts_min} / {s.hosts_mean:.1f} / {s.hosts_max}"),
        ("Hosts started / stopped", f"{s.hosts_started} / {s.hosts_stopped}"),
        ("Simulated time", f"{s.simulated_hours:,.1f} h"),
        ("Scheduler events", f"{s.scheduler_events:,}"),
        ("Replay time", f"{s.replay_seconds:.1f} s ({s.events_per_second:,.0f} events/s)"),
    ]


def summary_table(outcomes: Sequence[PolicyOutcome], title: str = "") -> Table:
    """Metrics down, policies across."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("")
    for outcome in outcomes:
        table.add_column(outcome.summary.policy, justify="right")
    columns = [_rows(o.summary) for o in outcomes]
    for index, (label, _) in enumerate(columns[0] if columns else []):
        table.add_row(label, *(rows[index][1] for rows in columns))
    ratio = held_ratio(outcomes, "notebookos", "reservation")
    if ratio is not None:
        table.caption = f"GPU-hours held, notebookos / reservation: {ratio:.2f}"
        table.caption_justify = "left"
    return table


def write_json(path: Path, report: SimulationReport) -> None:
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


#: The summary fields written to ``summary.csv`` (the percentile list stays in the JSON).
_CSV_FIELDS = [name for name in PolicySummary.model_fields if name != "delay_percentiles_s"]


def write_summary_csv(path: Path, outcomes: Sequence[PolicyOutcome]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(_CSV_FIELDS)
        for outcome in outcomes:
            values = outcome.summary.model_dump()
            writer.writerow(values[name] for name in _CSV_FIELDS)


def write_timeline_csv(path: Path, outcomes: Sequence[PolicyOutcome]) -> None:
    """One row per policy and time bucket: hours from the start, mean and peak GPUs
    committed, most hosts."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["policy", "hour", "gpus_committed_mean", "gpus_committed_max", "hosts"])
        for outcome in outcomes:
            line = outcome.timeline
            for index, mean in enumerate(line.committed_mean):
                writer.writerow(
                    [
                        outcome.summary.policy,
                        f"{index * line.bucket_seconds / 3600:.4f}",
                        f"{mean:.3f}",
                        line.committed_max[index],
                        line.hosts[index],
                    ]
                )
