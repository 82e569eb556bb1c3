"""A kernel's execution bookkeeping: pure, no I/O (beside :mod:`._routing`).

Every ``execute_request`` a client sends gets a *term*, the kernel's execution index, that the
replicas of a replicated kernel elect an executor for. The cell waits (for GPUs, ``replica``
None) until the scheduler's driver dispatches it to a replica; if that replica is lost before
it answers, the cell is sent to another one under the same term with the next *attempt*. The
last term whose reply arrived is the state the next cell's executor must have applied
(``after_term``); a reply to a re-sent attempt that says the lost replica had won the term does
not count (the cell's state, if any, is not coming).

:class:`GatewayKernel` (``_kernel``) holds one :class:`Executions` and does the sending; this
module only keeps the numbers, so that they are unit-tested without sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..protocol import cpu_magic_line

__all__ = ["Execution", "Executions", "requested_gpus"]


def requested_gpus(code: object) -> int | None:
    """How many GPUs a cell asks for itself: 0 for a ``%%cpu`` cell (it runs at once, with
    none bound, even when the kernel asks for GPUs and none is free), else None (the
    kernel's request)."""
    if not isinstance(code, str):
        return None
    return None if cpu_magic_line(code.splitlines()) is None else 0


Request = TypeVar("Request")
Owner = TypeVar("Owner")


@dataclass(slots=True)
class Execution(Generic[Request, Owner]):
    """An execute request, kept until its reply: it waits for GPUs (``replica`` None), then
    runs on a replica, and is sent to another one if that replica is lost first."""

    term: int
    attempt: int
    msg_id: str
    request: Request
    owner: Owner
    replica: str | None = None
    devices: tuple[int, ...] | None = None
    #: Whether the user was told it waits for GPUs (the gate times the wait).
    announced: bool = False
    #: Why the replica that last ran it is gone (it runs again elsewhere).
    lost_reason: str = ""

    @property
    def waiting(self) -> bool:
        """Not sent to a replica (yet, or again after its replica was lost)."""
        return self.replica is None


class Executions(Generic[Request, Owner]):
    """The open cells of one kernel, by message id and by term, and the kernel's terms."""

    def __init__(self) -> None:
        self._next_term = 1
        self._last_replied_term = 0
        self._execution_count = 0
        self._by_msg: dict[str, Execution[Request, Owner]] = {}
        self._by_term: dict[int, Execution[Request, Owner]] = {}

    # -- reading ------------------------------------------------------------------------------

    @property
    def next_term(self) -> int:
        """The term the next cell gets."""
        return self._next_term

    @property
    def last_replied_term(self) -> int:
        """The last term whose reply arrived (its state is the base of the next cell)."""
        return self._last_replied_term

    @property
    def execution_count(self) -> int:
        """The last ``execution_count`` the executing replica announced."""
        return self._execution_count

    def __len__(self) -> int:
        return len(self._by_msg)

    def __iter__(self) -> Iterator[Execution[Request, Owner]]:
        return iter(list(self._by_msg.values()))

    def get(self, msg_id: str) -> Execution[Request, Owner] | None:
        return self._by_msg.get(msg_id)

    def at(self, term: int) -> Execution[Request, Owner] | None:
        """The open cell of ``term``, if any."""
        return self._by_term.get(term)

    def waiting_at(self, term: int) -> Execution[Request, Owner] | None:
        """The cell of ``term`` if it is open and not on a replica."""
        execution = self._by_term.get(term)
        return execution if execution is not None and execution.waiting else None

    def waiting_terms(self) -> list[int]:
        """Terms of cells not sent to a replica, oldest first."""
        return [term for term, e in self._by_term.items() if e.waiting]

    def is_open(self, execution: Execution[Request, Owner]) -> bool:
        """Whether ``execution`` is still the open cell of its term (not answered)."""
        return self._by_term.get(execution.term) is execution

    # -- a cell's life ------------------------------------------------------------------------

    def submit(self, msg_id: str, request: Request, owner: Owner) -> Execution[Request, Owner]:
        """A new cell: it takes the next term (first attempt), waiting."""
        execution = Execution(self._next_term, 1, msg_id, request, owner)
        self._next_term += 1
        self._by_msg[msg_id] = execution
        self._by_term[execution.term] = execution
        return execution

    def dispatched(
        self, execution: Execution[Request, Owner], replica: str, devices: tuple[int, ...] | None
    ) -> None:
        """The cell is sent to ``replica`` with GPU ``devices`` (None: nothing said of GPUs)."""
        execution.replica = replica
        execution.devices = devices

    def metadata(
        self,
        execution: Execution[Request, Owner],
        replicated: bool,
        devices: tuple[int, ...] | None,
    ) -> dict[str, Any]:
        """The fields of the request's ``nbcluster`` metadata (``ExecuteMetadata``): the term,
        attempt and the term whose state must be applied first, for a replicated kernel; the
        cell's GPUs when the gate bound some (``()``: none). Empty: send nothing."""
        fields: dict[str, Any] = {}
        if replicated:
            fields = {
                "term": execution.term,
                "attempt": execution.attempt,
                "after_term": self._last_replied_term,
            }
        if devices is not None:
            fields["gpus"] = devices
        return fields

    def forget(self, execution: Execution[Request, Owner]) -> None:
        """The cell is answered (or refused): it is no longer open."""
        self._by_msg.pop(execution.msg_id, None)
        if self._by_term.get(execution.term) is execution:
            del self._by_term[execution.term]

    def replied(self, execution: Execution[Request, Owner], yielded: bool) -> bool:
        """The cell's reply arrived (``yielded``: a replica's reply saying it did not run the
        cell). Returns whether the cell was lost with its replica: a re-sent attempt whose
        lost replica had won the term, whose state is not coming (so the next cell does not
        wait for it)."""
        self.forget(execution)
        lost = execution.attempt > 1 and yielded
        if not lost:
            self._last_replied_term = max(self._last_replied_term, execution.term)
        return lost

    def rerun_from(self, replica: str, reason: str) -> list[Execution[Request, Owner]]:
        """``replica`` is lost: the cells it had not answered wait again, under the same term
        with the next attempt. Returns them, oldest first."""
        rerun = []
        for execution in self._by_msg.values():
            if execution.replica == replica:
                execution.attempt += 1
                execution.replica = None
                execution.lost_reason = reason
                rerun.append(execution)
        return rerun

    def counted(self, count: object) -> None:
        """The executing replica announced an ``execution_count`` (an int, else ignored)."""
        if isinstance(count, int):
            self._execution_count = count

    # -- the kernel's lifecycle ---------------------------------------------------------------

    def restart(self) -> None:
        """New replicas start empty: terms start again from 1."""
        self._next_term, self._last_replied_term = 1, 0

    def restored(self, term: int) -> None:
        """New replicas rebuilt the state of ``term``: later cells build on it."""
        self._last_replied_term = term
        self._next_term = max(self._next_term, term + 1)

    def continue_after(self, last_term: int) -> None:
        """A restarted gateway re-attached to replicas that applied ``last_term``: its terms
        continue after it."""
        self._last_replied_term = max(self._last_replied_term, last_term)
        self._next_term = max(self._next_term, last_term + 1)
