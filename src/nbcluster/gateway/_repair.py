"""Bringing a replicated kernel back to its configured number of replicas: the pure decisions.

The kernel manager runs one repair loop per kernel that lost a replica (``_recovery``). Each
attempt starts a replica on a host the scheduler picks, reconciles the Raft membership with
the replicas that run, and lets the new one join. What is decided here, without I/O or clocks:

* :class:`RetryPolicy`: how long to wait after failed attempts (exponential backoff with a
  cap) and how long one attempt may take.
* :func:`plan_membership`: which Raft members to remove and add, from the membership a live
  replica reports. An attempt that failed may or may not have changed the membership (a
  change can commit after its proposer gave up), so the next attempt reads it rather than
  assuming either.
* :func:`is_degraded`: whether a kernel runs with fewer replicas than configured, for the
  cluster API and the ``nbcluster_kernels_degraded`` gauge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["MembershipPlan", "RepairStatus", "RetryPolicy", "is_degraded", "plan_membership"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between replacement attempts of one kernel.

    After ``n`` consecutive failures the next attempt waits ``first_delay * factor**(n-1)``
    seconds, at most ``max_delay``: a host that refuses replicas is not hammered, and a
    kernel never waits longer than ``max_delay`` once a host could take the replica (a host
    that registers ends the wait at once). ``attempt_timeout`` bounds one attempt: start,
    membership change, join and catch-up; an attempt past it is abandoned and cleaned up.
    """

    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    attempt_timeout: float = 90.0

    def __post_init__(self) -> None:
        if not (0 < self.first_delay <= self.max_delay) or self.factor < 1:
            raise ValueError(
                "a retry policy needs 0 < first_delay <= max_delay and factor >= 1, got "
                f"{self.first_delay}, {self.max_delay}, {self.factor}"
            )
        if self.attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be positive, got {self.attempt_timeout}")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next attempt after ``failures`` consecutive failed
        ones (0: none failed, go at once)."""
        if failures <= 0:
            return 0.0
        # min() before the power would overflow: factor**failures grows without bound.
        exponent = min(failures - 1, 64)
        return min(self.max_delay, self.first_delay * self.factor**exponent)


@dataclass(frozen=True, slots=True)
class MembershipPlan:
    """Raft membership changes, in the order they must be made (every removal, then the
    addition): pysyncobj takes one change at a time, and removing first never lets the
    group need a member that is not running yet for its majority."""

    remove: tuple[str, ...]
    add: tuple[str, ...]
    #: Replicas that run but that the reporting member does not count as members. Not
    #: repaired here (adding a member that already runs its node is not the documented
    #: procedure); the caller reports them.
    missing: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.remove and not self.add


def plan_membership(members: Iterable[str], running: Iterable[str], new: str) -> MembershipPlan:
    """The changes that make the Raft group exactly the ``running`` replicas plus ``new``.

    ``members``: the membership a live member reports (its log status; it includes changes
    appended but not yet committed, which is what a further change builds on). Members that
    are neither running nor ``new`` are removed: the dead replica being replaced, and the
    replica of an earlier failed attempt whose addition did commit. ``new`` is added unless
    an earlier attempt already added that same address.
    """
    current = set(members)
    keep = set(running)
    remove = tuple(sorted(current - keep - {new}))
    add = (new,) if new not in current else ()
    return MembershipPlan(remove, add, tuple(sorted(keep - current)))


def is_degraded(execution_state: str, wanted: int, serving: int, reclaimed: bool) -> bool:
    """Whether a kernel runs with fewer replicas than configured.

    ``serving``: replicas that can run cells (running, or not yet confirmed after a gateway
    restart); a replacement still catching up does not count. Kernels being started,
    restarted or restored, dead ones, single-replica ones and ones whose replicas were
    released while idle are not degraded: they either have all their replicas, have none by
    design, or are reported by their state.
    """
    if wanted <= 1 or reclaimed:
        return False
    if execution_state in ("starting", "restarting", "dead"):
        return False
    return serving < wanted


@dataclass(slots=True)
class RepairStatus:
    """What a kernel's repair loop is doing, for the cluster API (``repair`` of a kernel)."""

    #: Consecutive failed attempts (reset by a success).
    failed_attempts: int = 0
    last_error: str = ""
    #: When the next attempt starts (None: one is under way, or none failed).
    retry_at: datetime | None = None
    attempting: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "attempting": self.attempting,
            "failed_attempts": self.failed_attempts,
            "last_error": self.last_error,
            "retry_at": (
                None if self.retry_at is None else self.retry_at.isoformat().replace("+00:00", "Z")
            ),
        }
