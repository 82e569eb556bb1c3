"""A recording as a workload: the kernels and cells the gateway saw, to replay them under
other policies or another cluster ("replay last week").

A session is a kernel id, from its first ``KernelRequested`` (or adoption) to its last
``KernelStopped`` (a kernel reclaimed while idle and restored keeps one session; one never
stopped closes at the recording's end). A cell is sent at its first ``ExecutionRequested``
and runs for as long as it ran: from the ``BindGpus`` that started it to its
``ExecutionFinished`` (a migration the gateway carried out first counts in it). Cells
interrupted while waiting, refused, or without a reply by the end are left out (counted in
the notes). The recorded hosts become the workload's cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..scheduling import (
    BindGpus,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    KernelAdopted,
    KernelRequested,
    KernelStopped,
    RefuseCell,
    ReplicaAdopted,
    Resources,
)
from ._recording import Recording
from ._workload import Cell, RecordedHost, Session, Workload

__all__ = ["recording_workload"]


@dataclass(slots=True)
class _CellDraft:
    submit: float
    gpus: int
    start: float | None = None
    end: float | None = None
    dropped: bool = False


@dataclass(slots=True)
class _SessionDraft:
    kernel_id: str
    opens: float
    request: Resources
    closes: float | None = None
    cells: list[_CellDraft] = field(default_factory=list)


def recording_workload(recording: Recording) -> Workload:
    steps = list(recording.steps())
    start = steps[0].at if steps else 0.0
    sessions: dict[str, _SessionDraft] = {}
    cells: dict[tuple[str, int], _CellDraft] = {}
    hosts: dict[str, RecordedHost] = {}
    now = 0.0
    for step in steps:
        now = step.at - start
        match step.event:
            case KernelRequested() | KernelAdopted() | ReplicaAdopted():
                draft = sessions.get(step.event.kernel_id)
                if draft is None:
                    sessions[step.event.kernel_id] = _SessionDraft(
                        step.event.kernel_id, now, step.event.request
                    )
                elif not isinstance(step.event, ReplicaAdopted):
                    draft.closes = None  # restored after a reclaim, or restarted
            case KernelStopped():
                if (draft := sessions.get(step.event.kernel_id)) is not None:
                    draft.closes = now
            case ExecutionRequested():
                key = (step.event.kernel_id, step.event.term)
                draft = sessions.get(step.event.kernel_id)
                if draft is not None and key not in cells:
                    gpus = 0 if step.event.gpus == 0 else draft.request.gpus
                    cells[key] = _CellDraft(now, gpus)
                    draft.cells.append(cells[key])
            case ExecutionFinished():
                finished = cells.get((step.event.kernel_id, step.event.term))
                if finished is not None and finished.start is None:
                    finished.dropped = True
                elif finished is not None and finished.end is None:
                    finished.end = now
            case ExecutionCancelled():
                cancelled = cells.get((step.event.kernel_id, step.event.term))
                if cancelled is not None and cancelled.start is None:
                    cancelled.dropped = True
            case HostAdded():
                if step.event.name not in hosts:
                    hosts[step.event.name] = RecordedHost(
                        step.event.name,
                        step.event.spec,
                        step.event.gpu_devices,
                        step.event.device_vram,
                    )
        for action in step.actions:
            if isinstance(action, BindGpus) and action.term is not None:
                bound = cells.get((action.kernel_id, action.term))
                if bound is not None and bound.start is None and not bound.dropped:
                    bound.start = now
            elif isinstance(action, RefuseCell) and (
                refused := cells.get((action.kernel_id, action.term))
            ):
                refused.dropped = True
    left_out = 0
    built: list[Session] = []
    for draft in sessions.values():
        kept: list[Cell] = []
        for cell in draft.cells:
            if cell.dropped or cell.start is None or cell.end is None:
                left_out += 1
                continue
            kept.append(Cell(cell.submit, cell.end - cell.start, cell.gpus))
        closes = now if draft.closes is None else max(draft.closes, draft.opens)
        built.append(Session(draft.kernel_id, draft.opens, closes, draft.request, tuple(kept)))
    built.sort(key=lambda s: s.opens)
    return Workload(
        str(recording.path),
        "nbcluster-recording",
        tuple(built),
        hosts=tuple(hosts.values()),
        notes=(
            f"{len(steps)} scheduler events from {len(recording.runs)} gateway run(s), "
            f"{len(hosts)} host(s); {left_out} cell(s) left out (interrupted while waiting, "
            "refused, or without a reply)",
        ),
    )
