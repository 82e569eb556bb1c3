"""The gateway's notifier: the one place a cluster notice is made. Each notice goes into the
ring (``GET /api/cluster/events`` and the event stream read it), into the Redis stream when
the gateway runs with ``--redis``, and into the gateway's log: the log line *is* the notice's
message, written with the logger of the module that noticed, so the log and the stream say
the same thing.

Built by the gateway (``_app``) and handed to the parts that notice things (the kernel
manager and what it owns, the jobs, the auto-scaler, the host endpoint)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from .._tasks import BackgroundTasks
from ..identity import Principal
from ..notices import (
    ClusterNotice,
    NoticeKind,
    NoticeRing,
    RedisNoticeLog,
    Severity,
)

__all__ = ["Notifier", "visible_to"]

log = logging.getLogger(__name__)

_LEVELS: dict[Severity, int] = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def visible_to(principal: Principal) -> Callable[[ClusterNotice], bool]:
    """Admins see every notice; a user those about their own kernels and jobs."""
    return lambda notice: principal.owns(notice.owner or "")


class Notifier:
    """Owned by the gateway; every method runs on its event loop."""

    def __init__(self, capacity: int = 10_000, redis_url: str | None = None) -> None:
        self.ring = NoticeRing(capacity)
        self._redis = None if redis_url is None else RedisNoticeLog(redis_url, capacity)
        self._unsent: list[ClusterNotice] = []
        self._wake = asyncio.Event()
        self._redis_down = False
        self._background = BackgroundTasks("notifier", log)

    def notify(
        self,
        kind: NoticeKind,
        severity: Severity,
        subject: str,
        message: str,
        *,
        owner: str | None = None,
        kernel_id: str | None = None,
        seconds: float | None = None,
        logger: logging.Logger | None = None,
    ) -> ClusterNotice:
        """Publish a notice and write its log line (with ``logger``: the caller's module's)."""
        notice = self.ring.publish(
            ClusterNotice(
                seq=0,
                time=datetime.now(UTC),
                severity=severity,
                kind=kind,
                subject=subject,
                message=message,
                owner=owner or None,
                kernel_id=kernel_id,
                seconds=None if seconds is None else round(seconds, 3),
            )
        )
        (logger or log).log(_LEVELS[severity], "%s", message)
        if self._redis is not None:
            self._unsent.append(notice)
            self._wake.set()
        return notice

    async def start(self) -> None:
        """With Redis: the ring starts from the stream (an earlier gateway's notices), and a
        task writes new notices to it."""
        if self._redis is None:
            return
        try:
            self.ring.restore(await asyncio.to_thread(self._redis.latest))
        except redis.RedisError as exc:
            self._store_unreachable(exc)
        self._background.spawn("notices to redis", self._write_to_redis())

    async def _write_to_redis(self) -> None:
        assert self._redis is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._unsent = self._unsent, []
            try:
                await asyncio.to_thread(self._redis.append, batch)
            except redis.RedisError as exc:
                # Kept in the ring; the stream misses them (bounded: not retried for ever).
                self._store_unreachable(exc)
                await asyncio.sleep(5)
            else:
                self._redis_down = False

    def _store_unreachable(self, exc: Exception) -> None:
        if self._redis_down:
            return  # said once per outage
        self._redis_down = True
        self.notify(
            "store_unreachable",
            "error",
            "cluster",
            f"the Redis stream of cluster notices is unreachable ({type(exc).__name__}: "
            f"{exc}); notices are kept in the gateway's memory only",
        )

    async def close(self) -> None:
        await self._background.close()
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError):
                if self._unsent:
                    await asyncio.to_thread(self._redis.append, self._unsent)
            self._redis.close()
