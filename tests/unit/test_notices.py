"""Cluster notices: the bounded ring, its filters and paging, live subscribers (a slow one is
dropped), the notifier's log lines, and ``/api/cluster/events`` in process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.gateway import GatewayConfig, create_app
from nbcluster.identity import Principal, UsersFile
from nbcluster.notices import (
    NOTICE_KINDS,
    SEVERITIES,
    ClusterNotice,
    NoticeQuery,
    NoticeRing,
    SubscriberDropped,
    severity_rank,
)

TOKEN = "t"


def draft(
    kind: str = "host_joined",
    severity: str = "info",
    subject: str = "host/h1",
    owner: str | None = None,
) -> ClusterNotice:
    return ClusterNotice.model_validate(
        {
            "seq": 0,
            "time": datetime.now(UTC),
            "severity": severity,
            "kind": kind,
            "subject": subject,
            "message": f"{kind} of {subject}",
            "owner": owner,
        }
    )


def everyone(notice: ClusterNotice) -> bool:
    return True


# -- the ring ---------------------------------------------------------------------------------


def test_the_ring_numbers_notices_and_keeps_only_the_newest() -> None:
    ring = NoticeRing(capacity=3)
    kept = [ring.publish(draft()) for _ in range(5)]
    assert [n.seq for n in kept] == [1, 2, 3, 4, 5]
    assert len(ring) == 3 and ring.oldest_seq == 3 and ring.last_seq == 5
    page = ring.page(NoticeQuery(), everyone)
    assert [n.seq for n in page.notices] == [3, 4, 5]
    assert page.oldest == 3 and page.next == 5 and not page.more


def test_a_ring_needs_room() -> None:
    with pytest.raises(ValueError, match="capacity"):
        NoticeRing(capacity=0)


def test_filters_keep_kind_severity_subject_and_since() -> None:
    ring = NoticeRing()
    ring.publish(draft("host_joined", "info", "host/h1"))
    ring.publish(draft("host_lost", "error", "host/h2"))
    ring.publish(draft("replica_lost", "warning", "kernel/k1"))
    ring.publish(draft("cell_waited", "info", "kernel/k1"))

    def seqs(**query: object) -> list[int]:
        return [n.seq for n in ring.page(NoticeQuery.model_validate(query), everyone).notices]

    assert seqs(kinds=("host_lost", "cell_waited")) == [2, 4]
    assert seqs(severity="warning") == [2, 3]
    assert seqs(severity="error") == [2]
    assert seqs(subject="kernel/k1") == [3, 4]
    assert seqs(subject="host/") == [1, 2]
    assert seqs(since=2) == [3, 4]


def test_a_cursor_from_an_earlier_gateway_starts_again() -> None:
    ring = NoticeRing()
    ring.publish(draft())
    assert [n.seq for n in ring.page(NoticeQuery(since=99), everyone).notices] == [1]


def test_a_bad_query_names_the_field() -> None:
    with pytest.raises(ValueError, match="kinds"):
        NoticeQuery.model_validate({"kinds": ["no_such_kind"]})
    with pytest.raises(ValueError, match="limit"):
        NoticeQuery(limit=0)


@given(
    notices=st.lists(
        st.tuples(
            st.sampled_from(NOTICE_KINDS),
            st.sampled_from(SEVERITIES),
            st.sampled_from(["host/a", "host/b", "kernel/k"]),
            st.sampled_from([None, "alice", "bob"]),
        ),
        max_size=40,
    ),
    capacity=st.integers(1, 50),
    limit=st.integers(1, 7),
    severity=st.sampled_from(SEVERITIES),
)
def test_paging_gives_every_matching_visible_notice_once_in_order(
    notices: list[tuple[str, str, str, str | None]], capacity: int, limit: int, severity: str
) -> None:
    ring = NoticeRing(capacity)
    for kind, sev, subject, owner in notices:
        ring.publish(draft(kind, sev, subject, owner))
    alice = Principal(role="user", user="alice")

    def visible(n: ClusterNotice) -> bool:
        return alice.owns(n.owner or "")

    expected = [
        n.seq
        for n in ring.page(NoticeQuery(limit=1000), everyone).notices
        if n.owner == "alice" and severity_rank(n.severity) >= severity_rank(severity)  # type: ignore[arg-type]
    ]
    got: list[int] = []
    since = 0
    for _ in range(len(notices) + 2):
        page = ring.page(
            NoticeQuery.model_validate({"since": since, "limit": limit, "severity": severity}),
            visible,
        )
        assert len(page.notices) <= limit
        got += [n.seq for n in page.notices]
        since = page.next
        if not page.more:
            break
    assert got == expected


# -- subscribers ------------------------------------------------------------------------------


async def test_subscribers_get_what_they_may_see_and_a_slow_one_is_dropped() -> None:
    ring = NoticeRing()
    fast = ring.subscribe(everyone, limit=100)
    slow = ring.subscribe(everyone, limit=2)
    bobs = ring.subscribe(lambda n: n.owner == "bob", limit=100)
    for owner in ("alice", "bob", "alice"):
        ring.publish(draft(owner=owner))
    assert slow.dropped and ring.subscribers == 2
    assert [(await fast.next(1)).seq for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]
    bob_first = await bobs.next(1)
    assert bob_first is not None and bob_first.owner == "bob" and bobs.pending() == 0
    # The slow one is told where it got to (nothing handed out yet: the ring's head then).
    with pytest.raises(SubscriberDropped, match="since=0") as dropped:
        await slow.next(1)
    assert dropped.value.last_seq == 0
    # Later notices are not queued for it.
    ring.publish(draft())
    assert slow.pending() == 0 and fast.pending() == 1


async def test_next_times_out_with_none_and_wakes_on_a_notice() -> None:
    ring = NoticeRing()
    subscription = ring.subscribe(everyone)
    assert await subscription.next(timeout=0.01) is None
    waiter = asyncio.ensure_future(subscription.next(timeout=10))
    await asyncio.sleep(0)
    ring.publish(draft("scale_out"))
    notice = await asyncio.wait_for(waiter, 10)
    assert notice is not None and notice.kind == "scale_out" and subscription.last_seq == 1
    ring.unsubscribe(subscription)
    assert ring.subscribers == 0


def test_restore_continues_the_numbering() -> None:
    earlier = NoticeRing()
    stored = [earlier.publish(draft()) for _ in range(4)]
    ring = NoticeRing(capacity=2)
    ring.restore(stored)
    assert ring.oldest_seq == 3 and ring.publish(draft()).seq == 5
    with pytest.raises(RuntimeError):
        ring.restore(stored)


# -- the notifier and the API -----------------------------------------------------------------


@pytest.fixture
async def gateway_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    app = create_app(GatewayConfig(token=TOKEN, state_dir=tmp_path / "state"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://gateway",
            headers={"Authorization": f"token {TOKEN}"},
        ) as c,
    ):
        yield c, app.state.gateway


async def test_a_notice_is_also_the_log_line(
    gateway_client: tuple[httpx.AsyncClient, object], caplog: pytest.LogCaptureFixture
) -> None:
    _, gateway = gateway_client
    logger = logging.getLogger("nbcluster.gateway._reconcile")
    with caplog.at_level(logging.INFO):
        notice = gateway.notifier.notify(  # type: ignore[attr-defined]
            "host_lost", "error", "host/h9", "host h9 is lost", logger=logger
        )
    [record] = [r for r in caplog.records if r.getMessage() == "host h9 is lost"]
    assert record.levelno == logging.ERROR and record.name == "nbcluster.gateway._reconcile"
    assert notice.seq == gateway.notifier.ring.last_seq  # type: ignore[attr-defined]


async def test_events_api_filters_and_hides_other_users_notices(
    gateway_client: tuple[httpx.AsyncClient, object], tmp_path: Path
) -> None:
    client, gateway = gateway_client
    notify = gateway.notifier.notify  # type: ignore[attr-defined]
    notify("host_joined", "info", "host/h1", "host h1 connected")
    notify("replica_lost", "warning", "kernel/k1", "alice's replica", owner="alice", kernel_id="k1")
    notify("job_failed", "error", "job/j1", "bob's job", owner="bob")
    users = UsersFile(tmp_path / "state" / "users.json")
    alice = {"Authorization": f"token {users.add('alice')}"}

    everything = (await client.get("/api/cluster/events")).json()
    assert [n["kind"] for n in everything["notices"]] == [
        "host_joined",
        "replica_lost",
        "job_failed",
    ]
    theirs = (await client.get("/api/cluster/events", headers=alice)).json()
    assert [n["message"] for n in theirs["notices"]] == ["alice's replica"]
    assert theirs["notices"][0]["kernel_id"] == "k1"

    filtered = await client.get(
        "/api/cluster/events", params={"kind": ["host_joined", "job_failed"], "severity": "error"}
    )
    assert [n["kind"] for n in filtered.json()["notices"]] == ["job_failed"]
    paged = (await client.get("/api/cluster/events", params={"limit": 1, "since": 1})).json()
    assert [n["seq"] for n in paged["notices"]] == [2] and paged["more"] and paged["next"] == 2

    bad = await client.get("/api/cluster/events", params={"kind": "nonsense"})
    assert bad.status_code == 400 and "kind" in bad.json()["message"]
    assert (
        await client.get("/api/cluster/events", headers={"Authorization": ""})
    ).status_code == 401


async def test_overview_for_an_admin_and_for_a_user(
    gateway_client: tuple[httpx.AsyncClient, object], tmp_path: Path
) -> None:
    client, _ = gateway_client
    users = UsersFile(tmp_path / "state" / "users.json")
    alice = {"Authorization": f"token {users.add('alice')}"}
    admin = (await client.get("/api/cluster/overview")).json()
    assert admin["admin"] and admin["totals"]["hosts"] == 0 and admin["hosts"] == []
    user = (await client.get("/api/cluster/overview", headers=alice)).json()
    assert user["user"] == "alice" and not user["admin"] and user["totals"] is None


async def test_the_dashboard_and_docs_need_no_token_but_their_data_does(
    gateway_client: tuple[httpx.AsyncClient, object],
) -> None:
    client, _ = gateway_client
    anonymous = {"Authorization": ""}
    for path in (
        "/dashboard",
        "/docs",
        "/redoc",
        "/dashboard/static/js/app.js",
        "/dashboard/static/vendor/swagger-ui-5.35.0/LICENSE",
    ):
        response = await client.get(path, headers=anonymous)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
    page = (await client.get("/docs", headers=anonymous)).text
    assert "cdn" not in page.lower() and "swagger-ui-bundle.js" in page
    for path in ("/openapi.json", "/api/cluster/overview", "/api/cluster/events/stream"):
        assert (await client.get(path, headers=anonymous)).status_code == 401, path
    missing = await client.get("/dashboard/static/../../_version.py", headers=anonymous)
    assert missing.status_code in (401, 404)
    assert (await client.get("/dashboard/static/nope.js", headers=anonymous)).status_code == 404
