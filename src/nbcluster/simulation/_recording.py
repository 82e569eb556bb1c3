"""nbcluster's own recording format: every event the gateway's scheduler was given, with its
wall time, the replica ids it made and the decisions it returned, as typed JSON lines.

The gateway writes it (``nbcluster gateway --record FILE``, through ``_recorder``);
``nbcluster simulate FILE`` reads it back (:func:`read_recording`) to replay the week under
other policies (``_recording_workload``) or to check that the scheduler still makes the same
decisions (``_replay``). One file may hold several runs: each gateway start appends a header.

Lines (``docs/simulation.md``, "Recording format")::

    {"record": "header", "format": "nbcluster-recording", "version": 1, "started": "...",
     "max_subscription_ratio": 7.0, "replicas_per_kernel": 3}
    {"record": "step", "at": 1717171717.25, "event": "ExecutionRequested",
     "fields": {"kernel_id": "...", "term": 3, ...}, "new_replica_ids": [],
     "actions": [{"action": "BindGpus", "fields": {...}}]}

``event``/``action`` name a dataclass of :mod:`nbcluster.scheduling` and ``fields`` are its
fields (pydantic validates them against it), so a new event type is recorded without a change
here.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from ..scheduling import Action, Event
from ._errors import TraceError

__all__ = [
    "FORMAT",
    "VERSION",
    "RecordedAction",
    "RecordedStep",
    "Recording",
    "RecordingHeader",
    "RecordingRun",
    "StepLine",
    "decode_action",
    "decode_event",
    "encode_action",
    "encode_event",
    "read_recording",
]

FORMAT = "nbcluster-recording"
VERSION = 1


class RecordingHeader(BaseModel):
    """The first line of each run: the scheduler's settings (events alone do not say them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: Literal["header"] = "header"
    format: Literal["nbcluster-recording"] = "nbcluster-recording"
    version: Literal[1] = 1
    started: datetime
    max_subscription_ratio: float = Field(gt=0)
    replicas_per_kernel: int = Field(ge=1)


class RecordedAction(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: str
    fields: dict[str, JsonValue]


class StepLine(BaseModel):
    """One event given to the scheduler and what it decided."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    record: Literal["step"] = "step"
    #: Seconds: the wall clock (a gateway) or the simulated clock (``simulate --record``).
    at: float = Field(ge=0, allow_inf_nan=False)
    event: str
    fields: dict[str, JsonValue]
    #: The replica ids the scheduler made while it handled the event (random in a gateway),
    #: so that a replay makes the same ones.
    new_replica_ids: list[str] = Field(default_factory=list)
    actions: list[RecordedAction] = Field(default_factory=list)


_Line = TypeAdapter(Annotated[RecordingHeader | StepLine, Field(discriminator="record")])


@dataclass(frozen=True, slots=True)
class RecordedStep:
    """A step, decoded: ``line`` is where it is in the file."""

    line: int
    at: float
    event: Event
    new_replica_ids: tuple[str, ...]
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class RecordingRun:
    """What one gateway run recorded (from one header to the next)."""

    header: RecordingHeader
    line: int
    steps: tuple[RecordedStep, ...]


@dataclass(frozen=True, slots=True)
class Recording:
    path: Path
    runs: tuple[RecordingRun, ...]

    def steps(self) -> Iterator[RecordedStep]:
        for run in self.runs:
            yield from run.steps


# -- the codec --------------------------------------------------------------------------------


@cache
def _event_types() -> dict[str, type]:
    return {t.__name__: t for t in typing.get_args(Event)}


@cache
def _action_types() -> dict[str, type]:
    return {t.__name__: t for t in typing.get_args(Action)}


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(kind: type) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def _plain(value: Any) -> Any:
    """What pydantic cannot write by itself: any ``Mapping`` (a field typed ``Mapping`` may
    hold one that is not a dict)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot record a {type(value).__name__}")


def encode_event(event: Event) -> tuple[str, dict[str, JsonValue]]:
    """The event's type name and its fields as JSON values."""
    fields: dict[str, JsonValue] = _adapter(type(event)).dump_python(
        event, mode="json", fallback=_plain, warnings=False
    )
    return type(event).__name__, fields


def encode_action(action: Action) -> RecordedAction:
    fields: dict[str, JsonValue] = _adapter(type(action)).dump_python(
        action, mode="json", fallback=_plain, warnings=False
    )
    return RecordedAction(action=type(action).__name__, fields=fields)


def decode_event(name: str, fields: dict[str, JsonValue]) -> Event:
    """The event ``encode_event`` wrote; ``ValueError`` naming what is wrong."""
    kind = _event_types().get(name)
    if kind is None:
        raise ValueError(f"unknown scheduler event {name!r}")
    event: Event = _validated(kind, fields, f"event {name}")
    return event


def decode_action(recorded: RecordedAction) -> Action:
    kind = _action_types().get(recorded.action)
    if kind is None:
        raise ValueError(f"unknown scheduler action {recorded.action!r}")
    action: Action = _validated(kind, recorded.fields, f"action {recorded.action}")
    return action


def _validated(kind: type, fields: dict[str, JsonValue], what: str) -> Any:
    try:
        return _adapter(kind).validate_python(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{what}: field {where!r}: {first['msg']}") from None


# -- the reader -------------------------------------------------------------------------------


def read_recording(path: Path) -> Recording:
    """Every run of a recording; :class:`TraceError` with the line for a line that is not
    JSON or not a header/step, an unknown event or action, fields that do not fit it, a step
    before any header, or a time earlier than the line before."""
    runs: list[RecordingRun] = []
    header: tuple[RecordingHeader, int] | None = None
    steps: list[RecordedStep] = []
    previous: tuple[float, int] | None = None
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, 1):
                if not raw.strip():
                    continue
                try:
                    line = _Line.validate_json(raw)
                except ValidationError as exc:
                    raise TraceError(path, number, _first_error(exc)) from None
                if isinstance(line, RecordingHeader):
                    if header is not None:
                        runs.append(RecordingRun(header[0], header[1], tuple(steps)))
                    header, steps = (line, number), []
                    continue
                if header is None:
                    raise TraceError(
                        path, number, "a step before any header: not an nbcluster recording"
                    )
                if previous is not None and line.at < previous[0]:
                    raise TraceError(
                        path,
                        number,
                        f"time goes backwards (unsorted times): {line.at} is before "
                        f"{previous[0]} on line {previous[1]}",
                    )
                previous = (line.at, number)
                try:
                    event = decode_event(line.event, line.fields)
                    actions = tuple(decode_action(a) for a in line.actions)
                except ValueError as exc:
                    raise TraceError(path, number, str(exc)) from None
                steps.append(
                    RecordedStep(number, line.at, event, tuple(line.new_replica_ids), actions)
                )
    except OSError as exc:
        raise TraceError(path, None, f"cannot read it: {exc.strerror or exc}") from None
    if header is None:
        raise TraceError(path, None, "empty: no header line, not an nbcluster recording")
    runs.append(RecordingRun(header[0], header[1], tuple(steps)))
    return Recording(path, tuple(runs))


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    if first["type"] in ("json_invalid", "json_type"):
        return f"not a JSON object: {first['msg']}"
    where = ".".join(str(part) for part in first["loc"])
    return f"field {where!r}: {first['msg']}" if where else str(first["msg"])
