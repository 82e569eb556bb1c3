"""What the simulator replays: notebook sessions (kernels) and the cells they run.

Every trace reader (``_tiresias``, ``_templates``, ``_recording_workload``) turns its file
into one :class:`Workload`; the engine (``_engine``) knows nothing of the formats. Times are
seconds from the trace's start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import Resources

__all__ = ["Cell", "RecordedHost", "Session", "Workload"]


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell execution (a training): sent at ``submit``, runs ``duration`` seconds once it
    has its GPUs. ``gpus``: what it uses (0: a CPU cell, sent like ``%%cpu``; otherwise the
    cell is bound its kernel's request, as the gateway binds it)."""

    submit: float
    duration: float
    gpus: int


@dataclass(frozen=True, slots=True)
class Session:
    """One notebook's kernel: opened at ``opens`` with ``request``, shut down at ``closes``
    (later if a delayed cell still runs then). Cells are in submission order; a cell sent
    while the previous one runs queues behind it, as in any Jupyter kernel."""

    session_id: str
    opens: float
    closes: float
    request: Resources
    cells: tuple[Cell, ...]


@dataclass(frozen=True, slots=True)
class RecordedHost:
    """A host a recording saw (``HostAdded``): a replay on "the recorded cluster" uses these."""

    name: str
    spec: Resources
    gpu_devices: tuple[int, ...] = ()
    device_vram: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Workload:
    """A trace, read. ``sessions`` are sorted by ``opens``; ``hosts`` is the cluster the trace
    ran on when it says (recordings), else empty; ``notes`` say how it was read (the
    grouping of trainings into sessions, the tick length) for the report."""

    source: str
    trace_format: str
    sessions: tuple[Session, ...]
    hosts: tuple[RecordedHost, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def cells(self) -> int:
        return sum(len(s.cells) for s in self.sessions)

    @property
    def span(self) -> float:
        """Seconds from the first session's opening to the last one's closing."""
        if not self.sessions:
            return 0.0
        return max(s.closes for s in self.sessions) - self.sessions[0].opens

    @property
    def gpu_hours_needed(self) -> float:
        """The GPU-hours its cells run for: what any policy must at least hold."""
        return sum(c.gpus * c.duration for s in self.sessions for c in s.cells) / 3600
