"""How trainings without sessions become notebook sessions (Tiresias-style traces).

A Tiresias CSV lists GPU trainings, not the notebooks that ran them; but what a policy costs
depends on the sessions: ``reservation`` holds a session's GPUs from its opening to its
closing, idle or not. :func:`group_trainings` (called by ``_tiresias``) builds them with one
documented, configurable rule (``docs/simulation.md``, "Grouping trainings into sessions"):

* trainings are taken in submission order; each goes to a session of the same key (its GPU
  count, and its model name with ``by_model``) that is idle (its last training has ended)
  and has been idle for at most ``idle_gap`` seconds, and is younger than ``max_length``;
  among those, the one that finished most recently (the user who just got a result runs the
  next cell);
* otherwise it opens a new session, ``lead`` seconds before the training;
* a session closes ``tail`` seconds after its last training ends (default ``idle_gap``: an
  idle notebook is shut down, or reclaimed, after that long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..scheduling import DEFAULT_REQUEST, Resources
from ._workload import Cell, Session

__all__ = ["SessionGrouping", "Training", "group_trainings"]


@dataclass(frozen=True, slots=True)
class Training:
    """One row of a Tiresias trace, in seconds."""

    job_id: str
    submit: float
    duration: float
    gpus: int
    model: str = ""


@dataclass(frozen=True, slots=True)
class SessionGrouping:
    """The grouping rule's knobs, in seconds (see the module's docstring)."""

    #: A training joins a session idle for at most this long (30 min: NotebookOS's
    #: ``adobe-sensei`` idle-session reclamation).
    idle_gap: float = 1800.0
    #: A new session opens this long before its first training.
    lead: float = 0.0
    #: A session closes this long after its last training ends (None: ``idle_gap``).
    tail: float | None = None
    #: A training never joins a session that opened this long before it (None: no limit).
    max_length: float | None = None
    #: Sessions hold trainings of one model name only (as well as one GPU count).
    by_model: bool = False

    def __post_init__(self) -> None:
        for name in ("idle_gap", "lead", "tail", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"session grouping: {name} must not be negative, got {value}")

    @property
    def closing_tail(self) -> float:
        return self.idle_gap if self.tail is None else self.tail

    def describe(self) -> str:
        """One line for the report."""
        words = [
            f"trainings grouped into sessions by GPU count{' and model' if self.by_model else ''}",
            f"a training joins a session idle for at most {self.idle_gap:g} s",
            f"sessions open {self.lead:g} s before their first training",
            f"close {self.closing_tail:g} s after their last one",
        ]
        if self.max_length is not None:
            words.append(f"last at most {self.max_length:g} s")
        return ", ".join(words)


@dataclass(slots=True)
class _Open:
    session_id: str
    opens: float
    last_end: float
    key: tuple[int, str]
    cells: list[Cell] = field(default_factory=list)


def group_trainings(
    trainings: Sequence[Training], grouping: SessionGrouping
) -> tuple[Session, ...]:
    """The sessions ``trainings`` form under ``grouping``, sorted by opening time. Each
    session's kernel asks for its trainings' GPU count (and the default CPU and memory)."""
    ordered = sorted(trainings, key=lambda t: (t.submit, t.job_id))
    candidates: dict[tuple[int, str], list[_Open]] = {}
    sessions: list[_Open] = []
    for training in ordered:
        key = (training.gpus, training.model if grouping.by_model else "")
        pool = candidates.setdefault(key, [])
        # Sessions idle for longer than the gap have closed for good: drop them.
        pool[:] = [s for s in pool if training.submit - s.last_end <= grouping.idle_gap]
        chosen: _Open | None = None
        for session in pool:
            if session.last_end > training.submit:
                continue  # still running a training
            if (
                grouping.max_length is not None
                and training.submit - session.opens > grouping.max_length
            ):
                continue
            if chosen is None or session.last_end > chosen.last_end:
                chosen = session
        if chosen is None:
            chosen = _Open(
                f"s{len(sessions) + 1}", training.submit - grouping.lead, training.submit, key
            )
            sessions.append(chosen)
            pool.append(chosen)
        chosen.cells.append(Cell(training.submit, training.duration, training.gpus))
        chosen.last_end = training.submit + training.duration
    # What a kernel started with only KERNEL_GPUS asks for.
    cpus, memory = DEFAULT_REQUEST.millicpus, DEFAULT_REQUEST.memory_mb
    return tuple(
        Session(
            s.session_id,
            s.opens,
            s.last_end + grouping.closing_tail,
            Resources(s.key[0], cpus, memory),
            tuple(s.cells),
        )
        for s in sorted(sessions, key=lambda s: s.opens)
    )
