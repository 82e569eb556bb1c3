"""Replaying workloads through the real scheduler (``nbcluster simulate``, issue 18).

Trace readers (Tiresias/Sensei CSVs with a documented grouping of trainings into sessions,
NotebookOS workload templates, and nbcluster's own recordings) make a :class:`Workload`;
:func:`simulate` replays it in simulated time through the gateway's
:class:`~nbcluster.scheduling.Scheduler`, policies and ``scaling_decision``; the writers give
a terminal table, JSON, CSV and PNG plots. :func:`recording_scheduler` is what the gateway
records its scheduler's events with (``nbcluster gateway --record FILE``).
"""

from ._engine import Progress, simulate
from ._errors import TraceError
from ._grouping import SessionGrouping, Training, group_trainings
from ._plots import plots_available, write_plots
from ._recorder import EventRecorder, RecordingScheduler, recording_scheduler
from ._recording import (
    RecordedStep,
    Recording,
    RecordingHeader,
    RecordingRun,
    read_recording,
)
from ._recording_workload import recording_workload
from ._replay import Mismatch, ReplayCheck, verify_recording
from ._report import (
    SimulationReport,
    WorkloadSummary,
    held_ratio,
    simulation_report,
    summary_table,
    write_json,
    write_summary_csv,
    write_timeline_csv,
)
from ._results import PolicyOutcome, PolicySummary, Timeline, percentile
from ._settings import Cluster, SimulationSettings, simulated_host_spec
from ._templates import read_template
from ._tiresias import read_tiresias_csv
from ._traces import TRACE_FORMATS, LoadedTrace, detect_format, read_trace
from ._workload import Cell, RecordedHost, Session, Workload

__all__ = [
    "TRACE_FORMATS",
    "Cell",
    "Cluster",
    "EventRecorder",
    "LoadedTrace",
    "Mismatch",
    "PolicyOutcome",
    "PolicySummary",
    "Progress",
    "RecordedHost",
    "RecordedStep",
    "Recording",
    "RecordingHeader",
    "RecordingRun",
    "RecordingScheduler",
    "ReplayCheck",
    "Session",
    "SessionGrouping",
    "SimulationReport",
    "SimulationSettings",
    "Timeline",
    "TraceError",
    "Training",
    "Workload",
    "WorkloadSummary",
    "detect_format",
    "group_trainings",
    "held_ratio",
    "percentile",
    "plots_available",
    "read_recording",
    "read_template",
    "read_tiresias_csv",
    "read_trace",
    "recording_scheduler",
    "recording_workload",
    "simulate",
    "simulated_host_spec",
    "simulation_report",
    "summary_table",
    "verify_recording",
    "write_json",
    "write_plots",
    "write_summary_csv",
    "write_timeline_csv",
]
