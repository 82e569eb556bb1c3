"""The notices' Redis stream against the Redis server on 127.0.0.1:6379 (as the store's
Redis tests), under a key of each test's own: appended notices come back in order, the stream
stays capped, and an entry written by another version is skipped rather than failing the
gateway's start."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from nbcluster.notices import ClusterNotice, RedisNoticeLog

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def key() -> Iterator[str]:
    name = f"nbcluster-test-{secrets.token_hex(4)}:notices"
    yield name
    client = redis.Redis(host="127.0.0.1", port=6379)
    client.delete(name)
    client.close()


def _notice(seq: int) -> ClusterNotice:
    return ClusterNotice(
        seq=seq,
        time=datetime.now(UTC),
        severity="warning",
        kind="replica_lost",
        subject=f"kernel/k{seq}",
        message=f"replica {seq} lost",
        owner="ada",
        kernel_id=f"k{seq}",
    )


def test_notices_round_trip_in_order_and_the_stream_stays_capped(key: str) -> None:
    log = RedisNoticeLog(URL, capacity=50, key=key)
    try:
        sent = [_notice(i) for i in range(1, 301)]
        for start in range(0, 300, 60):
            log.append(sent[start : start + 60])
        back = log.latest()
        assert back == sent[-50:]
        client = redis.Redis(host="127.0.0.1", port=6379)
        # Trimming is approximate (cheap for Redis): bounded, not exact.
        assert 50 <= client.xlen(key) < 300
        client.close()
    finally:
        log.close()


def test_an_unreadable_entry_is_skipped(key: str) -> None:
    log = RedisNoticeLog(URL, capacity=10, key=key)
    try:
        log.append([_notice(1)])
        client = redis.Redis(host="127.0.0.1", port=6379)
        client.xadd(key, {"notice": b'{"seq": "not a number"}'})
        client.xadd(key, {"other": b"x"})
        client.close()
        log.append([_notice(2)])
        assert [n.seq for n in log.latest()] == [1, 2]
    finally:
        log.close()


def test_the_gateways_prefix_names_the_stream(key: str) -> None:
    """The gateway's ``--redis`` URL may carry the job store's ``?prefix=``: it keys the
    stream and is not passed to the client (which would refuse it)."""
    prefix = key.removesuffix("notices")
    log = RedisNoticeLog(f"{URL}?prefix={prefix}", capacity=10)
    try:
        log.append([_notice(7)])
        assert [n.seq for n in log.latest()] == [7]
        client = redis.Redis(host="127.0.0.1", port=6379)
        assert client.xlen(key) == 1
        client.close()
    finally:
        log.close()
