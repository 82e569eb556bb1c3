"""NotebookOS workload templates (JSON): sessions with ``start_tick``/``stop_tick`` and
``trainings`` (``start_tick``, ``duration_in_ticks``, ``gpus``, ``cpus`` in millicpus,
``memory`` in MB, ``vram`` in GB; per-GPU utilisations are ignored).

A session's kernel asks for the most its trainings need of each resource (NotebookOS's
generator gives each session its maximum CPU, memory, GPUs and VRAM); each training is one
cell. Errors name the line of the session or training at fault: the JSON is parsed with a
decoder that remembers where each object starts.
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..scheduling import Resources
from ._errors import TraceError
from ._workload import Cell, Session, Workload

__all__ = ["read_template"]

_M = TypeVar("_M", bound=BaseModel)


class _Training(BaseModel):
    model_config = ConfigDict(extra="ignore")

    start_tick: float
    duration_in_ticks: float
    gpus: int = Field(ge=0)
    cpus: float = Field(default=0.0, ge=0)
    memory: float = Field(default=0.0, ge=0)
    vram: float = Field(default=0.0, ge=0)


class _Session(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    start_tick: float
    stop_tick: float
    trainings: list[dict[str, Any]]


class _Template(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sessions: list[dict[str, Any]] = Field(min_length=1)


class _Located(dict[str, Any]):
    """A JSON object and the line its ``{`` is on."""

    line: int = 0


def read_template(path: Path, tick_seconds: float = 60.0) -> Workload:
    """The workload of a NotebookOS template; :class:`TraceError` with the line for malformed
    JSON, a missing or mistyped field, a negative duration, a session that stops before it
    starts, a training outside its session or trainings out of order."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(path, None, f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(path, None, f"not UTF-8 text: {exc.reason}") from None
    try:
        document = _load_located(text)
    except json.JSONDecodeError as exc:
        raise TraceError(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    if not isinstance(document, _Located):
        raise TraceError(path, 1, "a workload template is a JSON object with a 'sessions' list")
    _validate(_Template, document, path, document.line, "the template")
    sessions: list[Session] = []
    ids: dict[str, int] = {}
    # The raw objects, not the validated copies: they know their lines.
    for number, raw in enumerate(document["sessions"], 1):
        line = _line_of(raw, document.line)
        what = f"session {number}"
        session = _validate(_Session, raw, path, line, what)
        session_id = session.id or f"session-{number}"
        if session_id in ids:
            raise TraceError(
                path, line, f"{what}: id {session_id!r} repeats the one of line {ids[session_id]}"
            )
        ids[session_id] = line
        if session.stop_tick < session.start_tick:
            raise TraceError(
                path,
                line,
                f"{what} stops (tick {session.stop_tick:g}) before it starts "
                f"(tick {session.start_tick:g})",
            )
        cells: list[Cell] = []
        most = Resources()
        previous: tuple[float, int] | None = None
        for index, raw_training in enumerate(raw["trainings"], 1):
            at = _line_of(raw_training, line)
            label = f"{what}, training {index}"
            training = _validate(_Training, raw_training, path, at, label)
            if training.duration_in_ticks < 0:
                raise TraceError(
                    path,
                    at,
                    f"{label}: negative duration_in_ticks {training.duration_in_ticks:g}",
                )
            if not session.start_tick <= training.start_tick <= session.stop_tick:
                raise TraceError(
                    path,
                    at,
                    f"{label} starts at tick {training.start_tick:g}, outside its session "
                    f"(ticks {session.start_tick:g} to {session.stop_tick:g})",
                )
            if previous is not None and training.start_tick < previous[0]:
                raise TraceError(
                    path,
                    at,
                    f"{label}: trainings are not in time order: it starts at tick "
                    f"{training.start_tick:g}, before the one of line {previous[1]} "
                    f"(tick {previous[0]:g})",
                )
            previous = (training.start_tick, at)
            cells.append(
                Cell(
                    training.start_tick * tick_seconds,
                    training.duration_in_ticks * tick_seconds,
                    training.gpus,
                )
            )
            most = Resources(
                max(most.gpus, training.gpus),
                max(most.millicpus, math.ceil(training.cpus)),
                max(most.memory_mb, math.ceil(training.memory)),
                max(most.vram_gb, training.vram),
            )
        sessions.append(
            Session(
                session_id,
                session.start_tick * tick_seconds,
                session.stop_tick * tick_seconds,
                most,
                tuple(cells),
            )
        )
    sessions.sort(key=lambda s: s.opens)
    return Workload(
        str(path),
        "notebookos-template",
        tuple(sessions),
        notes=(
            f"{len(sessions)} sessions; one tick is {tick_seconds:g} s; each kernel asks for "
            "the most its trainings use",
        ),
    )


def _validate(model: type[_M], raw: object, path: Path, line: int, what: str) -> _M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        field = f" field {where!r}" if where else ""
        raise TraceError(path, line, f"{what}:{field} {first['msg']}") from None


def _line_of(raw: object, default: int) -> int:
    return raw.line if isinstance(raw, _Located) else default


def _load_located(text: str) -> Any:
    """``json.loads`` whose objects are :class:`_Located` (the pure-Python scanner calls the
    decoder's ``parse_object`` with each object's offset)."""
    starts = [0]
    starts.extend(i + 1 for i, char in enumerate(text) if char == "\n")
    decoder = json.JSONDecoder()
    plain_object: Any = getattr(json.decoder, "JSONObject")  # noqa: B009 (untyped in typeshed)

    def parse_object(s_and_end: tuple[str, int], *args: Any) -> tuple[_Located, int]:
        found, end = plain_object(s_and_end, *args)
        located = _Located(found)
        located.line = bisect.bisect_right(starts, s_and_end[1] - 1)
        return located, end

    decoder.parse_object = parse_object  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode(text)
