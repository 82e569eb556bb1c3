"""Cluster notices: what the gateway tells operators and users (a host lost, a replica
replaced, a cell that waited for GPUs), typed, kept in a bounded ring (and a Redis stream),
paged by ``GET /api/cluster/events`` and streamed as server-sent events. See
``docs/dashboard.md``."""

from ._notice import (
    NOTICE_KINDS,
    SEVERITIES,
    ClusterNotice,
    NoticeKind,
    NoticePage,
    NoticeQuery,
    Severity,
    severity_rank,
)
from ._overview import ClusterOverview, GpuTotals
from ._redis import RedisNoticeLog
from ._ring import NoticeRing, NoticeSubscription, SubscriberDropped

__all__ = [
    "NOTICE_KINDS",
    "SEVERITIES",
    "ClusterNotice",
    "ClusterOverview",
    "GpuTotals",
    "NoticeKind",
    "NoticePage",
    "NoticeQuery",
    "NoticeRing",
    "NoticeSubscription",
    "RedisNoticeLog",
    "Severity",
    "SubscriberDropped",
    "severity_rank",
]
