"""The cluster notices over HTTP: ``GET /api/cluster/events`` (filters, paging), the same as
server-sent events (``GET /api/cluster/events/stream``, optionally interleaved with overview
snapshots for live views) and ``GET /api/cluster/overview``.

Read by the dashboard (``/dashboard``), ``nbcluster top`` and operators' scripts. A user sees
the notices about their own kernels and jobs; an admin every notice."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from ..notices import (
    ClusterNotice,
    ClusterOverview,
    NoticeKind,
    NoticePage,
    NoticeQuery,
    Severity,
)
from ..notices import SubscriberDropped as _Dropped
from ._auth import principal_of
from ._http import ERROR_RESPONSES
from ._notifier import visible_to
from ._overview import build_overview

if TYPE_CHECKING:
    from ._app import Gateway

__all__ = ["build_notices_router"]

#: Notices a stream may fall behind by before it is dropped (it resumes with Last-Event-ID).
STREAM_BACKLOG = 1000
#: A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _frame(event: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def build_notices_router() -> APIRouter:
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.get(
        "/api/cluster/events",
        summary="Cluster notices (hosts, replicas, migrations, scaling, jobs ...), oldest first",
        response_model=NoticePage,
    )
    async def list_events(
        request: Request,
        kind: Annotated[list[NoticeKind] | None, Query(description="Kinds to keep")] = None,
        severity: Annotated[Severity, Query(description="The least severity kept")] = "info",
        subject: Annotated[str, Query(max_length=300, description="Subject prefix")] = "",
        since: Annotated[int, Query(ge=0, description="Notices after this seq")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> NoticePage:
        query = NoticeQuery(
            kinds=tuple(kind or ()), severity=severity, subject=subject, since=since, limit=limit
        )
        return _gateway(request).notifier.ring.page(query, visible_to(principal_of(request)))

    @router.get(
        "/api/cluster/overview",
        summary="Hosts, GPUs, kernels, jobs and queues the caller may see, in one snapshot",
        response_model=ClusterOverview,
    )
    async def overview(request: Request) -> ClusterOverview:
        return build_overview(_gateway(request), principal_of(request))

    @router.get(
        "/api/cluster/events/stream",
        summary="Cluster notices as server-sent events (event: notice), with overview "
        "snapshots every `overview` seconds (event: overview) when asked",
        response_class=StreamingResponse,
        responses={200: {"description": "The stream", "content": {"text/event-stream": {}}}},
    )
    async def stream_events(
        request: Request,
        kind: Annotated[list[NoticeKind] | None, Query()] = None,
        severity: Annotated[Severity, Query()] = "info",
        subject: Annotated[str, Query(max_length=300)] = "",
        since: Annotated[
            int | None, Query(ge=0, description="Replay stored notices after this seq first")
        ] = None,
        overview: Annotated[
            float, Query(ge=0, le=3600, description="Seconds between overviews; 0: none")
        ] = 0,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        gateway = _gateway(request)
        principal = principal_of(request)
        visible = visible_to(principal)
        query = NoticeQuery(kinds=tuple(kind or ()), severity=severity, subject=subject)
        resume = since
        if last_event_id is not None and last_event_id.strip().isdigit():
            resume = int(last_event_id)  # a browser's EventSource reconnecting
        ring = gateway.notifier.ring
        # Subscribed before the replay is read, so nothing falls between the two.
        subscription = ring.subscribe(visible, STREAM_BACKLOG)

        async def frames() -> AsyncIterator[bytes]:
            try:
                if resume is not None:
                    cursor = resume
                    while True:
                        page = ring.page(
                            query.model_copy(update={"since": cursor, "limit": 1000}), visible
                        )
                        for stored in page.notices:
                            if stored.seq <= subscription.last_seq:
                                yield _notice_frame(stored)
                        if not page.more or page.next >= subscription.last_seq:
                            break
                        cursor = page.next
                next_overview = time.monotonic()
                while True:
                    now = time.monotonic()
                    if overview and now >= next_overview:
                        snapshot = build_overview(gateway, principal)
                        yield _frame("overview", snapshot.model_dump_json())
                        next_overview = now + overview
                    wait = KEEPALIVE_SECONDS
                    if overview:
                        wait = min(wait, max(next_overview - time.monotonic(), 0.0))
                    try:
                        notice = await subscription.next(timeout=wait)
                    except _Dropped as exc:
                        yield _frame("dropped", str(exc.last_seq))
                        return
                    if notice is None:
                        if not overview:
                            yield b": keep-alive\n\n"
                        continue
                    if query.matches(notice):
                        yield _notice_frame(notice)
                        # What the notice changed shows at once, not at the next tick.
                        next_overview = min(next_overview, time.monotonic() + 0.2)
            finally:
                ring.unsubscribe(subscription)

        return StreamingResponse(
            frames(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return router


def _notice_frame(notice: ClusterNotice) -> bytes:
    return _frame("notice", notice.model_dump_json(), notice.seq)
