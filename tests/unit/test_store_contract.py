"""The contract every object store backend keeps, run against each of them: in memory, a local
directory, Redis (the server on 127.0.0.1:6379, under a key prefix of this test's own) and S3
(a moto server started on a free port)."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbcluster.store import (
    InMemoryStore,
    LocalDirectoryStore,
    ObjectCorruptedError,
    ObjectNotFoundError,
    ObjectStore,
    open_store,
)


@dataclass
class Backend:
    store: ObjectStore
    #: Opens a second, independent client of the same store.
    reopen: Callable[[], ObjectStore]
    #: Damages the stored bytes of a key (None: the backend cannot be damaged from outside).
    corrupt: Callable[[str], None] | None


def _memory(tmp_path: Path, moto: Callable[[], str]) -> Backend:
    store = InMemoryStore()
    return Backend(store, lambda: store, None)


def _local(tmp_path: Path, moto: Callable[[], str]) -> Backend:
    root = tmp_path / "objects"

    def corrupt(key: str) -> None:
        path = root.joinpath(*key.split("/"))
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))

    return Backend(open_store(root.as_uri()), lambda: LocalDirectoryStore(root), corrupt)


def _redis(tmp_path: Path, moto: Callable[[], str]) -> Backend:
    import redis

    prefix = f"nbcluster-test-{secrets.token_hex(4)}/"
    url = f"redis://127.0.0.1:6379/0?prefix={prefix}&chunk_mb=1"
    raw = redis.Redis(host="127.0.0.1", port=6379)

    def corrupt(key: str) -> None:
        chunks = sorted(k for k in raw.scan_iter(match=f"{prefix}*") if b"chunk" in k)
        assert chunks, "no chunk keys found to damage"
        for name in chunks:
            value = bytearray(raw.get(name) or b"")
            if value:
                value[0] ^= 0xFF
                raw.set(name, bytes(value))
                return

    return Backend(open_store(url), lambda: open_store(url), corrupt)


def _s3(tmp_path: Path, moto: Callable[[], str]) -> Backend:
    import boto3

    endpoint = moto()
    bucket = f"nbcluster-{secrets.token_hex(4)}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/objects?endpoint_url={endpoint}"

    def corrupt(key: str) -> None:
        name = f"objects/{key}"
        head = client.head_object(Bucket=bucket, Key=name)
        body = bytearray(client.get_object(Bucket=bucket, Key=name)["Body"].read())
        body[-1] ^= 0xFF
        client.put_object(Bucket=bucket, Key=name, Body=bytes(body), Metadata=head["Metadata"])

    return Backend(open_store(url), lambda: open_store(url), corrupt)


BACKENDS = {"memory": _memory, "local": _local, "redis": _redis, "s3": _s3}


@pytest.fixture(params=sorted(BACKENDS))
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Backend]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    made = BACKENDS[request.param](tmp_path, lambda: request.getfixturevalue("moto_server"))
    yield made
    for info in list(made.store.list()):
        made.store.delete(info.key)


def test_put_get_round_trip(backend: Backend) -> None:
    store = backend.store
    payloads = {
        "empty": b"",
        "small": b"hello",
        "k/nested/deep": bytes(range(256)) * 10,
        # Crosses chunk boundaries in the Redis backend (chunk_mb=1 in this test).
        "big": os.urandom(3 * 2**20 + 17),
    }
    for key, data in payloads.items():
        store.put(key, data)
    for key, data in payloads.items():
        assert store.get(key) == data
    other = backend.reopen()
    assert other.get("big") == payloads["big"]


def test_overwrite_and_delete(backend: Backend) -> None:
    store = backend.store
    store.put("a", b"one")
    store.put("a", b"two, longer")
    assert store.get("a") == b"two, longer"
    store.delete("a")
    store.delete("a")  # deleting twice is fine
    with pytest.raises(ObjectNotFoundError) as caught:
        store.get("a")
    assert "'a'" in str(caught.value)
    with pytest.raises(ObjectNotFoundError):
        store.get("never-stored")


@pytest.mark.parametrize("key", ["", "../x", "a//b", ".hidden", "a/.b", "sp ace", "x" * 513])
def test_bad_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError):
        backend.store.put(key, b"x")
    with pytest.raises(ValueError):
        backend.store.get(key)


def test_list_by_prefix_with_sizes(backend: Backend) -> None:
    store = backend.store
    store.put("kernels/k1/a", b"12345")
    store.put("kernels/k1/b", b"")
    store.put("kernels/k2/a", b"1" * 2000)
    store.put("other", b"xy")
    assert [(i.key, i.size) for i in store.list("kernels/k1/")] == [
        ("kernels/k1/a", 5),
        ("kernels/k1/b", 0),
    ]
    assert [i.key for i in store.list()] == [
        "kernels/k1/a",
        "kernels/k1/b",
        "kernels/k2/a",
        "other",
    ]
    store.delete("kernels/k1/a")
    assert [i.key for i in store.list("kernels/")] == ["kernels/k1/b", "kernels/k2/a"]


def test_corruption_is_detected(backend: Backend) -> None:
    if backend.corrupt is None:
        pytest.skip("this backend keeps objects in process memory: nothing to damage")
    data = os.urandom(2 * 2**20 + 5)
    backend.store.put("victim", data)
    backend.corrupt("victim")
    with pytest.raises(ObjectCorruptedError) as caught:
        backend.store.get("victim")
    assert "victim" in str(caught.value)


def test_readers_never_see_a_partial_object(backend: Backend) -> None:
    store = backend.store
    versions = [bytes([n]) * (2 * 2**20 + n) for n in range(1, 5)]
    store.put("hot", versions[0])
    seen: list[bytes] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        reader = backend.reopen()
        while not stop.is_set() and len(seen) < 200:
            try:
                seen.append(reader.get("hot"))
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(3):
            for data in versions:
                store.put("hot", data)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert seen
    assert all(s in versions for s in seen), "a reader saw bytes that no writer wrote"
