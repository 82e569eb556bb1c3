"""Reading any trace: the format from the option or from the file, then its reader.

``nbcluster simulate`` calls :func:`read_trace`; a recording is read once and kept (the
exact replay of ``--verify`` needs its steps, the what-if replay its workload).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._errors import TraceError
from ._grouping import SessionGrouping
from ._recording import Recording, read_recording
from ._recording_workload import recording_workload
from ._templates import read_template
from ._tiresias import read_tiresias_csv
from ._workload import Workload

__all__ = ["TRACE_FORMATS", "LoadedTrace", "detect_format", "read_trace"]

#: ``--format`` values (``auto``: by the file's name, then its first character).
TRACE_FORMATS = ("auto", "tiresias", "template", "recording")


@dataclass(frozen=True, slots=True)
class LoadedTrace:
    workload: Workload
    #: The recording itself, when the trace is one.
    recording: Recording | None = None


def detect_format(path: Path) -> str:
    """``tiresias`` for ``.csv``, ``recording`` for ``.jsonl``, ``template`` for ``.json``;
    otherwise by content (a JSON object per line with a ``record`` key: a recording)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "tiresias"
    if suffix in (".jsonl", ".ndjson"):
        return "recording"
    if suffix == ".json":
        return "template"
    try:
        with path.open("rb") as file:
            head = file.read(4096).lstrip()
    except OSError as exc:
        raise TraceError(path, None, f"cannot read it: {exc.strerror or exc}") from None
    if head.startswith(b'{"record"'):
        return "recording"
    if head.startswith(b"{"):
        return "template"
    if head[:6].lower().startswith(b"job_id") or b"," in head.split(b"\n", 1)[0]:
        return "tiresias"
    raise TraceError(
        path, None, "cannot tell its format: name it with --format tiresias|template|recording"
    )


def read_trace(
    path: Path,
    trace_format: str = "auto",
    *,
    grouping: SessionGrouping | None = None,
    tick_seconds: float = 60.0,
) -> LoadedTrace:
    """The workload of ``path``; :class:`TraceError` for a bad trace (with its line)."""
    if trace_format not in TRACE_FORMATS:
        raise ValueError(
            f"unknown trace format {trace_format!r}; known: {', '.join(TRACE_FORMATS)}"
        )
    if not path.is_file():
        raise TraceError(path, None, "no such file")
    if trace_format == "auto":
        trace_format = detect_format(path)
    if trace_format == "tiresias":
        return LoadedTrace(read_tiresias_csv(path, grouping, tick_seconds))
    if trace_format == "template":
        return LoadedTrace(read_template(path, tick_seconds))
    recording = read_recording(path)
    return LoadedTrace(recording_workload(recording), recording)
