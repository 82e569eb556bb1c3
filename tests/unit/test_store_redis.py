"""RedisStore beyond the common contract: the manifest switch, orphan chunks and their
collection, missing chunks, retries and an unreachable server. Runs against the Redis server
on 127.0.0.1:6379, under a key prefix of each test's own."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from nbcluster.store import (
    ObjectCorruptedError,
    ObjectNotFoundError,
    StoreError,
    open_store,
)
from nbcluster.store._redis import RedisStore

from ..cluster import free_port

CHUNK = 1024


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=6379)
    yield client
    client.close()


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    prefix = f"nbcluster-test-{secrets.token_hex(4)}/"
    yield prefix
    leftovers = list(raw.scan_iter(match=f"{prefix}*"))
    if leftovers:
        raw.delete(*leftovers)


@pytest.fixture
def store(prefix: str) -> Iterator[RedisStore]:
    made = RedisStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix, chunk_size=CHUNK)
    yield made
    made.close()


def chunk_keys(raw: redis.Redis, prefix: str) -> set[str]:
    return {k.decode() for k in raw.scan_iter(match=f"{prefix}chunk/*")}


def test_layout_and_manifest_switch_deletes_old_chunks(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    first = os.urandom(3 * CHUNK + 1)
    store.put("k/x", first)
    assert raw.exists(f"{prefix}obj/k/x")
    old = chunk_keys(raw, prefix)
    assert len(old) == 4
    assert all(name.startswith(f"{prefix}chunk/k/x/") for name in old)

    second = os.urandom(2 * CHUNK)
    store.put("k/x", second)
    new = chunk_keys(raw, prefix)
    assert len(new) == 2
    assert not new & old, "the replaced version's chunks were not deleted"
    assert store.get("k/x") == second

    store.delete("k/x")
    assert chunk_keys(raw, prefix) == set()
    assert not raw.exists(f"{prefix}obj/k/x")


def test_empty_object_has_no_chunks(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    store.put("empty", b"")
    assert chunk_keys(raw, prefix) == set()
    assert store.get("empty") == b""
    assert [(i.key, i.size) for i in store.list()] == [("empty", 0)]


def test_accepts_bytearray_and_memoryview(store: RedisStore) -> None:
    data = bytearray(os.urandom(5 * CHUNK + 3))
    store.put("ba", data)
    store.put("mv", memoryview(data)[1:])  # type: ignore[arg-type]
    assert store.get("ba") == data
    assert store.get("mv") == data[1:]


def test_abandoned_put_leaves_orphans_that_gc_collects(
    store: RedisStore, raw: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("kept", os.urandom(2 * CHUNK))
    kept = chunk_keys(raw, prefix)

    # The writer "dies" between its chunks and its manifest.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("simulated failure before the manifest switch")

    monkeypatch.setattr(store._client, "getset", refuse)
    with pytest.raises(StoreError, match="'ghost'"):
        store.put("ghost", os.urandom(3 * CHUNK))
    with pytest.raises(StoreError, match="'kept'"):
        store.put("kept", os.urandom(3 * CHUNK))
    monkeypatch.undo()

    orphans = chunk_keys(raw, prefix) - kept
    assert len(orphans) == 6
    assert [i.key for i in store.list()] == ["kept"], "an object without manifest was listed"
    with pytest.raises(ObjectNotFoundError):
        store.get("ghost")

    # Young orphans may be a put in progress: left alone by default.
    assert store.gc_orphans() == 0
    assert store.gc_orphans(older_than=0) == 6
    assert chunk_keys(raw, prefix) == kept
    assert len(store.get("kept")) == 2 * CHUNK


def test_gc_removes_old_versions_left_by_failed_cleanups(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    store.put("a", b"x" * (CHUNK + 1))
    long_ago = f"{(int(time.time()) - 7200) * 1000:x}-{secrets.token_hex(8)}"
    stale = [f"{prefix}chunk/a/{long_ago}/0", f"{prefix}chunk/gone/deeper/{long_ago}/0"]
    for name in stale:
        raw.set(name, b"stale")
    assert store.gc_orphans() == 2
    assert not any(raw.exists(name) for name in stale)
    assert store.get("a") == b"x" * (CHUNK + 1)


def test_missing_chunk_with_unchanged_manifest_is_corruption(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    store.put("victim", os.urandom(3 * CHUNK))
    raw.delete(sorted(chunk_keys(raw, prefix))[1])
    with pytest.raises(ObjectCorruptedError, match=r"'victim'.*missing"):
        store.get("victim")


def test_unreadable_manifest_is_corruption(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    raw.set(f"{prefix}obj/bad", b"not json")
    with pytest.raises(ObjectCorruptedError, match=r"'bad'.*manifest"):
        store.get("bad")


def test_truncated_chunk_is_corruption(store: RedisStore, raw: redis.Redis, prefix: str) -> None:
    store.put("short", os.urandom(2 * CHUNK))
    name = sorted(chunk_keys(raw, prefix))[0]
    raw.set(name, (raw.get(name) or b"")[:-1])
    with pytest.raises(ObjectCorruptedError, match="'short'"):
        store.get("short")


def test_read_restarts_when_a_put_replaces_the_object_midway(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = b"o" * (3 * CHUNK), b"n" * (2 * CHUNK + 5)
    store.put("hot", old)
    real = store._read_chunks
    calls = 0

    def replaced_first(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            store.put("hot", new)  # deletes the chunks the reader is about to fetch
        return real(*args)

    monkeypatch.setattr(store, "_read_chunks", replaced_first)
    assert store.get("hot") == new
    assert calls == 2


def test_transient_errors_are_retried_and_a_landed_switch_is_kept(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("r", b"before")
    real = store._client.getset
    calls = 0

    def lost_reply(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        result = real(*args)
        if calls == 1:
            raise redis.ConnectionError("reply lost")  # the switch did happen
        return result

    monkeypatch.setattr(store._client, "getset", lost_reply)
    data = os.urandom(4 * CHUNK)
    store.put("r", data)
    assert calls == 2
    # The retry got its own manifest back as "the old one": its chunks must survive.
    assert store.get("r") == data


def test_other_redis_errors_become_store_errors(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    raw.hset(f"{prefix}obj/wrongtype", "f", "v")
    with pytest.raises(StoreError, match=r"'wrongtype'.*127\.0\.0\.1:6379.*WRONGTYPE"):
        store.get("wrongtype")


def test_unreachable_server_fails_quickly_naming_the_address() -> None:
    port = free_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", prefix="p/")
    try:
        for call in (
            lambda: store.put("k", b"data"),
            lambda: store.get("k"),
            lambda: store.delete("k"),
            lambda: list(store.list()),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                call()
            assert time.monotonic() - started < 5
            assert f"127.0.0.1:{port}" in str(caught.value)
            assert "4 attempts" in str(caught.value)
        assert "'k'" in str(caught.value) or "listing" in str(caught.value)
        with pytest.raises(ValueError):
            store.put("../bad", b"x")  # refused before any I/O
    finally:
        store.close()


def test_from_url_options_and_repr_without_password(prefix: str) -> None:
    store = open_store(f"redis://127.0.0.1:6379/0?prefix={prefix}&chunk_mb=0.5")
    assert isinstance(store, RedisStore)
    assert store.prefix == prefix
    assert store.chunk_size == 2**19
    store.put("via-url", b"hello")
    assert store.get("via-url") == b"hello"
    store.delete("via-url")
    store.close()

    secret = RedisStore.from_url("redis://someone:s3cr3t@db.example:6380/2")
    assert "s3cr3t" not in repr(secret)
    assert "db.example:6380/2" in repr(secret)


def test_list_escapes_glob_characters(store: RedisStore, prefix: str) -> None:
    other = RedisStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix + "[x]*/")
    try:
        other.put("a", b"1")
        store.put("b", b"22")
        assert [(i.key, i.size) for i in other.list()] == [("a", 1)]
        assert [i.key for i in other.list("b")] == []
    finally:
        other.delete("a")
        other.close()


def test_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError):
        RedisStore(redis.Redis(), chunk_size=0)
    with pytest.raises(ValueError):
        RedisStore(redis.Redis(decode_responses=True))
