"""Exact replay of a recording: the recorded events, fed in order to a fresh scheduler with
the recorded settings and replica ids, must give the recorded decisions.

``nbcluster simulate FILE --verify`` runs it (before the what-if replay) and the tests use it
to show that the simulator and the gateway decide alike for one event sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ..scheduling import Action, Scheduler, SchedulerConfig
from ._recording import Recording

__all__ = ["Mismatch", "ReplayCheck", "verify_recording"]


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A step whose replayed decisions differ from the recorded ones."""

    line: int
    event: str
    recorded: tuple[Action, ...]
    replayed: tuple[Action, ...]
    #: The replayed scheduler refused the event with this error (the recorded one did not).
    error: str = ""

    def describe(self) -> str:
        replayed = f"raised {self.error}" if self.error else _text(self.replayed)
        return f"line {self.line} ({self.event}): recorded {_text(self.recorded)}; {replayed}"


@dataclass(frozen=True, slots=True)
class ReplayCheck:
    steps: int
    runs: int
    #: The first mismatches (at most ``limit`` of :func:`verify_recording`).
    mismatches: tuple[Mismatch, ...]
    mismatched_steps: int

    @property
    def identical(self) -> bool:
        return self.mismatched_steps == 0


class _RecordedIds:
    """Hands the scheduler the ids the recorded one made, in order; numbered ones after."""

    def __init__(self) -> None:
        self.queue: deque[str] = deque()

    def load(self, ids: Iterable[str]) -> None:
        self.queue.clear()
        self.queue.extend(ids)

    def __call__(self, kernel_id: str, number: int) -> str:
        return self.queue.popleft() if self.queue else f"{kernel_id}-r{number}"


def verify_recording(recording: Recording, limit: int = 10) -> ReplayCheck:
    """Replay every run of ``recording`` and compare each step's decisions."""
    mismatches: list[Mismatch] = []
    mismatched = steps = 0
    for run in recording.runs:
        ids = _RecordedIds()
        scheduler = Scheduler(
            SchedulerConfig(
                max_subscription_ratio=run.header.max_subscription_ratio,
                replicas_per_kernel=run.header.replicas_per_kernel,
                new_replica_id=ids,
            )
        )
        for step in run.steps:
            steps += 1
            ids.load(step.new_replica_ids)
            error = ""
            try:
                replayed = tuple(scheduler.handle(step.event))
            except ValueError as exc:
                replayed, error = (), str(exc)
            if error or replayed != step.actions:
                mismatched += 1
                if len(mismatches) < limit:
                    name = type(step.event).__name__
                    mismatches.append(Mismatch(step.line, name, step.actions, replayed, error))
    return ReplayCheck(steps, len(recording.runs), tuple(mismatches), mismatched)


def _text(actions: tuple[Action, ...]) -> str:
    return "; ".join(repr(a) for a in actions) or "nothing"
