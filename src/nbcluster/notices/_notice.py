"""What the gateway tells operators: one :class:`ClusterNotice` per thing that happened to the
cluster (a host lost, a replica replaced, a cell that waited for GPUs ...).

Called "notices", not "events", because :mod:`nbcluster.scheduling` already has events (the
facts fed to the pure scheduler); a notice is what a person reads. Only the HTTP path keeps the
word (``/api/cluster/events``), as operators of other dashboards expect it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "NOTICE_KINDS",
    "SEVERITIES",
    "ClusterNotice",
    "NoticeKind",
    "NoticePage",
    "NoticeQuery",
    "Severity",
    "severity_rank",
]

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)

#: Every kind of notice; ``docs/dashboard.md`` says who emits each and when.
NoticeKind = Literal[
    "host_joined",
    "host_lost",
    "host_disconnected",
    "host_drained",
    "host_undrained",
    "replica_lost",
    "replica_replaced",
    "replacement_failed",
    "executor_changed",
    "migration_started",
    "migration_finished",
    "migration_failed",
    "kernel_restoring",
    "kernel_restored",
    "kernel_dead",
    "kernel_reclaimed",
    "scale_out",
    "scale_in",
    "scale_failed",
    "cell_waited",
    "job_failed",
    "job_requeued",
    "store_unreachable",
]
NOTICE_KINDS: tuple[NoticeKind, ...] = get_args(NoticeKind)


def severity_rank(severity: Severity) -> int:
    """0 for info, 1 for warning, 2 for error: ``severity=warning`` filters keep 1 and 2."""
    return SEVERITIES.index(severity)


class ClusterNotice(BaseModel):
    """One thing that happened, as ``GET /api/cluster/events`` and the event stream send it.

    Made by the gateway's notifier (``gateway/_notifier.py``), which also writes it as the
    gateway's log line, so the log and the stream never disagree."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Position in the gateway's stream, from 1, increasing; the paging cursor (``since``).
    seq: int = Field(ge=0)
    time: datetime
    severity: Severity
    kind: NoticeKind
    #: What it is about, as ``host/NAME``, ``kernel/ID``, ``replica/ID``, ``job/ID`` or
    #: ``cluster``; filters match it by prefix.
    subject: str = Field(min_length=1, max_length=300)
    message: str = Field(max_length=4000)
    #: The user whose kernel or job it concerns; None: a cluster notice (hosts, scaling,
    #: the store), which only admins see.
    owner: str | None = None
    #: The kernel it concerns, if any (the dashboard updates that kernel's row).
    kernel_id: str | None = None
    #: How long it took or waited (a migration, a cell's wait for GPUs), when that is the
    #: point.
    seconds: float | None = None


class NoticeQuery(BaseModel):
    """Filters and paging of ``GET /api/cluster/events`` (each one narrows)."""

    model_config = ConfigDict(extra="forbid")

    kinds: tuple[NoticeKind, ...] = ()
    #: The least severity kept.
    severity: Severity = "info"
    #: Kept when the subject starts with it (``kernel/abc`` keeps that kernel's notices,
    #: ``host/`` every host's).
    subject: str = ""
    #: Only notices after this ``seq`` (the previous page's ``next``).
    since: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)

    def matches(self, notice: ClusterNotice) -> bool:
        return (
            notice.seq > self.since
            and (not self.kinds or notice.kind in self.kinds)
            and severity_rank(notice.severity) >= severity_rank(self.severity)
            and notice.subject.startswith(self.subject)
        )


class NoticePage(BaseModel):
    """One page of notices, oldest first."""

    notices: list[ClusterNotice]
    #: Pass as ``since`` for the next page (the last ``seq`` looked at).
    next: int
    #: More matching notices follow (ask again with ``since=next``).
    more: bool
    #: The oldest ``seq`` the ring still holds: older ones were dropped to bound memory.
    oldest: int
