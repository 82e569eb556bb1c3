"""Writing a recording: a :class:`Scheduler` that appends every event it handles, with the
time, the replica ids it made and its decisions, to a file (``_recording``'s format).

The gateway's ``SchedulerDriver`` builds its scheduler with :func:`recording_scheduler` when
``nbcluster gateway --record FILE`` is given; the simulator does the same for
``simulate --record``. The scheduler's decisions are not changed by being recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from ..scheduling import Action, Event, Scheduler, SchedulerConfig
from ._recording import RecordingHeader, StepLine, encode_action, encode_event

__all__ = ["EventRecorder", "RecordingScheduler", "recording_scheduler"]

log = logging.getLogger(__name__)


class EventRecorder:
    """Appends steps to a recording file (created owner-readable only: it names kernels,
    users and hosts). A write that fails (a full disk) is logged once and recording stops;
    the scheduler keeps working."""

    def __init__(
        self, path: Path, config: SchedulerConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self._clock = clock
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[str] | None = os.fdopen(fd, "a", encoding="utf-8")
        header = RecordingHeader(
            started=datetime.now(UTC),
            max_subscription_ratio=config.max_subscription_ratio,
            replicas_per_kernel=config.replicas_per_kernel,
        )
        self._write(header.model_dump_json())

    def record(self, event: Event, new_replica_ids: list[str], actions: list[Action]) -> None:
        if self._file is None:
            return
        try:
            name, fields = encode_event(event)
            line = StepLine(
                at=self._clock(),
                event=name,
                fields=fields,
                new_replica_ids=new_replica_ids,
                actions=[encode_action(a) for a in actions],
            )
        except (ValueError, TypeError) as exc:  # pydantic's errors are ValueErrors
            # A recording with a step missing would replay wrong: stop it, loudly.
            log.error("recording to %s stopped: cannot record %r: %s", self.path, event, exc)
            self.close()
            return
        self._write(line.model_dump_json())

    def _write(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text + "\n")
            self._file.flush()
        except OSError as exc:
            log.error("recording to %s stopped: %s", self.path, exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                log.error("recording to %s: %s", self.path, exc)


class RecordingScheduler(Scheduler):
    """A :class:`Scheduler` whose every handled event is recorded (an event it refuses with
    an exception is not: it changed nothing)."""

    def __init__(self, config: SchedulerConfig, recorder: EventRecorder) -> None:
        self._name_replica = config.new_replica_id
        self._made: list[str] = []
        self._recorder = recorder
        super().__init__(dataclasses.replace(config, new_replica_id=self._new_replica_id))

    def _new_replica_id(self, kernel_id: str, number: int) -> str:
        replica_id = self._name_replica(kernel_id, number)
        self._made.append(replica_id)
        return replica_id

    def handle(self, event: Event) -> list[Action]:
        self._made = []
        actions = super().handle(event)
        self._recorder.record(event, self._made, actions)
        return actions

    def close(self) -> None:
        self._recorder.close()


def recording_scheduler(
    config: SchedulerConfig, path: Path, clock: Callable[[], float] = time.time
) -> RecordingScheduler:
    """A scheduler recording to ``path`` (appended to: a restarted gateway adds a run)."""
    return RecordingScheduler(config, EventRecorder(path, config, clock))
