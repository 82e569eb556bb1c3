"""Which replica executes each cell: a pure state machine fed the committed log.

Every replica applies the same committed records in the same order, so every replica reaches
the same decisions. The rule (one round, an improvement on NotebookOS's propose-then-vote):

* For each ``term`` (the gateway's execution index) and ``attempt``, the **first committed
  ``lead`` proposal wins**. Later leads for a decided term are ignored.
* If every member's ``yield`` for (term, attempt) commits before any lead, the attempt
  **fails**; the gateway retries the term with ``attempt + 1`` (a later attempt's lead
  reopens a failed term; a stale attempt's proposals are ignored).
* Proposals for a term at or below the last completed one are stale and ignored.

Why this is safe: Raft gives one total order of committed entries, identical on every replica
(log matching + leader completeness), and the decision is a deterministic function of that
order's prefix. Two replicas can therefore never decide different winners for the same
(term, attempt), whatever the message reordering or leader changes, and a decision never
changes once made: the entries that made it are committed and never rolled back. NotebookOS's
second round (votes) decides the same thing from the same order, one commit later.

:meth:`ElectionLog.apply` takes a record and returns the events it caused; nothing here does
I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._records import Done, Mark, Proposal, Record

__all__ = ["Completed", "Decided", "ElectionLog", "Event", "Failed", "Ignored"]

#: Decided terms kept for lookups; older ones are summarised by ``last_done_term``.
_KEEP_TERMS = 64


@dataclass(frozen=True, slots=True)
class Decided:
    term: int
    attempt: int
    winner: str


@dataclass(frozen=True, slots=True)
class Failed:
    term: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Completed:
    record: Done


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str


Event = Decided | Failed | Completed | Ignored


@dataclass
class _Term:
    attempt: int
    winner: str | None = None
    failed: bool = False
    yields: set[str] = field(default_factory=set)


class ElectionLog:
    """The election state every replica of one kernel keeps, one per replica."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.terms: dict[int, _Term] = {}
        self.last_done_term = 0
        self.last_done_count = 0

    def apply(self, record: Record) -> list[Event]:
        if isinstance(record, Mark):
            return [Ignored(f"mark from {record.replica}")]
        if isinstance(record, Done):
            return self._apply_done(record)
        return self._apply_proposal(record)

    def _apply_proposal(self, p: Proposal) -> list[Event]:
        if p.term <= self.last_done_term:
            return [Ignored(f"{p.kind} for term {p.term}, already completed")]
        state = self.terms.get(p.term)
        if state is None or p.attempt > state.attempt:
            if state is not None and state.winner is not None:
                return [Ignored(f"{p.kind} for decided term {p.term}")]
            state = self.terms[p.term] = _Term(p.attempt)
        elif p.attempt < state.attempt:
            return [Ignored(f"{p.kind} for stale attempt {p.attempt} of term {p.term}")]
        if state.winner is not None:
            return [Ignored(f"{p.kind} for decided term {p.term}")]
        if state.failed:
            # Every member yielded this attempt: it is over, also for a lead committed late.
            return [Ignored(f"{p.kind} for failed attempt {p.attempt} of term {p.term}")]
        if p.kind == "lead":
            state.winner = p.replica
            self._prune()
            return [Decided(p.term, p.attempt, p.replica)]
        state.yields.add(p.replica)
        if len(state.yields) >= self.members:
            state.failed = True
            return [Failed(p.term, p.attempt)]
        return []

    def _apply_done(self, d: Done) -> list[Event]:
        state = self.terms.get(d.term)
        if d.term <= self.last_done_term:
            return [Ignored(f"done for term {d.term}, already completed")]
        if state is None or state.winner != d.replica:
            # A done from a replica that did not win is a protocol violation: never apply it.
            return [Ignored(f"done for term {d.term} from {d.replica}, which was not elected")]
        self.last_done_term = d.term
        self.last_done_count = d.execution_count
        return [Completed(d)]

    def winner(self, term: int) -> str | None:
        state = self.terms.get(term)
        return state.winner if state else None

    def _prune(self) -> None:
        if len(self.terms) > _KEEP_TERMS:
            for term in sorted(self.terms)[: len(self.terms) - _KEEP_TERMS]:
                del self.terms[term]

    def snapshot(self) -> dict[str, Any]:
        return {
            "members": self.members,
            "last_done_term": self.last_done_term,
            "last_done_count": self.last_done_count,
            "terms": {
                str(t): [s.attempt, s.winner, s.failed, sorted(s.yields)]
                for t, s in self.terms.items()
            },
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> ElectionLog:
        log = cls(int(data["members"]))
        log.last_done_term = int(data["last_done_term"])
        log.last_done_count = int(data["last_done_count"])
        for term, (attempt, winner, failed, yields) in data["terms"].items():
            log.terms[int(term)] = _Term(int(attempt), winner, bool(failed), set(yields))
        return log
