"""S3Store beyond the store contract (tests/unit/test_store_contract.py): clear errors for a
missing bucket or an unreachable endpoint, objects not written by nbcluster, multipart uploads,
prefixes, retries. Runs against a moto server started on a free port."""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from nbcluster.store import (
    ObjectCorruptedError,
    ObjectNotFoundError,
    StoreError,
    open_store,
)
from nbcluster.store._s3 import DIGEST_METADATA, S3Store

from ..cluster import free_port

MiB = 2**20


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def raw(moto_server: str) -> Any:
    """A plain boto3 client of the moto server."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def bucket(raw: Any) -> str:
    name = f"nbcluster-{secrets.token_hex(4)}"
    raw.create_bucket(Bucket=name)
    return name


class FlakyClient:
    """Delegates to a real client; ``fail[method]`` lists errors to raise, one per call,
    before the real call goes through."""

    def __init__(self, client: Any, **fail: list[BaseException]) -> None:
        self._client = client
        self.fail = fail
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            errors = self.fail.get(name)
            if errors:
                raise errors.pop(0)
            return real(*args, **kwargs)

        return call


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"simulated {code}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


def test_repr_and_url_prefix_normalised(moto_server: str, bucket: str) -> None:
    store = open_store(f"s3://{bucket}/objects/?endpoint_url={moto_server}")
    assert isinstance(store, S3Store)
    assert store.prefix == "objects"
    assert bucket in repr(store) and moto_server in repr(store)
    store.put("k", b"v")
    assert [i.key for i in store.list()] == ["k"]


def test_objects_carry_their_digest_under_the_prefix(
    moto_server: str, bucket: str, raw: Any
) -> None:
    store = S3Store(bucket, "deep/prefix", endpoint_url=moto_server)
    store.put("a/b", b"payload")
    head = raw.head_object(Bucket=bucket, Key="deep/prefix/a/b")
    assert head["ContentLength"] == len(b"payload")
    assert len(head["Metadata"][DIGEST_METADATA]) == 32
    assert store.get("a/b") == b"payload"


def test_accepts_bytes_like_data(moto_server: str, bucket: str) -> None:
    store = S3Store(bucket, endpoint_url=moto_server)
    store.put("ba", bytearray(b"abc"))  # type: ignore[arg-type]
    store.put("mv", memoryview(b"xyz"))  # type: ignore[arg-type]
    assert store.get("ba") == b"abc"
    assert store.get("mv") == b"xyz"


def test_missing_bucket_is_a_store_error_naming_it(moto_server: str) -> None:
    name = f"no-such-bucket-{secrets.token_hex(4)}"
    store = S3Store(name, "p", endpoint_url=moto_server)
    for operation in (
        lambda: store.put("k", b"x"),
        lambda: store.get("k"),
        lambda: store.delete("k"),
        lambda: list(store.list()),
    ):
        with pytest.raises(StoreError) as caught:
            operation()
        assert not isinstance(caught.value, ObjectNotFoundError)
        message = str(caught.value)
        assert name in message and "does not exist" in message
        assert moto_server in message


def test_unreachable_endpoint_fails_quickly(bucket: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store(
        bucket, "p", endpoint_url=endpoint, attempts=2, request_attempts=2, connect_timeout=1
    )
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.get("k")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert bucket in message and endpoint in message
    assert "after 2 attempts" in message
    assert isinstance(caught.value.__cause__, EndpointConnectionError)
    with pytest.raises(StoreError):
        store.put("k", b"x")


def test_bad_keys_fail_before_any_io(bucket: str) -> None:
    # An endpoint with nothing behind it: any request would fail with StoreError, not ValueError.
    store = S3Store(bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", attempts=1)
    for key in ("", "../x", "a//b", ".hidden"):
        with pytest.raises(ValueError):
            store.put(key, b"x")
        with pytest.raises(ValueError):
            store.get(key)
        with pytest.raises(ValueError):
            store.delete(key)


def test_object_without_nbcluster_metadata_is_corrupt(
    moto_server: str, bucket: str, raw: Any
) -> None:
    raw.put_object(Bucket=bucket, Key="objects/foreign", Body=b"not ours")
    store = S3Store(bucket, "objects", endpoint_url=moto_server)
    with pytest.raises(ObjectCorruptedError) as caught:
        store.get("foreign")
    assert "foreign" in str(caught.value)
    assert "no checksum" in str(caught.value)
    assert "not written by nbcluster" in str(caught.value)


def test_altered_object_is_corrupt(moto_server: str, bucket: str, raw: Any) -> None:
    store = S3Store(bucket, endpoint_url=moto_server)
    store.put("k", b"original")
    digest = raw.head_object(Bucket=bucket, Key="k")["Metadata"][DIGEST_METADATA]
    raw.put_object(Bucket=bucket, Key="k", Body=b"0riginal", Metadata={DIGEST_METADATA: digest})
    with pytest.raises(ObjectCorruptedError, match="checksum mismatch"):
        store.get("k")


def test_multipart_upload_round_trips(moto_server: str, bucket: str, raw: Any) -> None:
    store = S3Store(
        bucket, "mp", endpoint_url=moto_server, multipart_threshold=6 * MiB, part_size=5 * MiB
    )
    data = os.urandom(12 * MiB + 3)  # three parts: 5 MiB, 5 MiB, 2 MiB + 3
    store.put("big", data)
    head = raw.head_object(Bucket=bucket, Key="mp/big")
    assert head["ETag"].strip('"').endswith("-3"), "not stored as a multipart upload"
    assert head["Metadata"][DIGEST_METADATA]
    assert store.get("big") == data
    assert [(i.key, i.size) for i in store.list()] == [("big", len(data))]
    assert not raw.list_multipart_uploads(Bucket=bucket).get("Uploads")
    # Small objects still go up in one PUT.
    store.put("small", b"s" * MiB)
    assert "-" not in raw.head_object(Bucket=bucket, Key="mp/small")["ETag"]


def test_failed_multipart_upload_is_aborted_and_invisible(
    moto_server: str, bucket: str, raw: Any
) -> None:
    flaky = FlakyClient(raw, upload_part=[client_error("AccessDenied", 403, "UploadPart")])
    store = S3Store(
        bucket,
        "mp",
        client=flaky,
        multipart_threshold=6 * MiB,
        part_size=5 * MiB,
        upload_threads=1,
    )
    with pytest.raises(StoreError, match="denied"):
        store.put("big", os.urandom(12 * MiB))
    assert flaky.calls.get("abort_multipart_upload") == 1
    assert not raw.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with pytest.raises(ObjectNotFoundError):
        store.get("big")
    assert list(store.list()) == []


def test_transient_errors_are_retried(moto_server: str, bucket: str, raw: Any) -> None:
    store = S3Store(bucket, endpoint_url=moto_server)
    store.put("k", b"value")
    flaky = FlakyClient(
        raw,
        get_object=[
            client_error("SlowDown", 503),
            EndpointConnectionError(endpoint_url=moto_server),
        ],
    )
    retried = S3Store(bucket, client=flaky, attempts=3)
    assert retried.get("k") == b"value"
    assert flaky.calls["get_object"] == 3


def test_transient_errors_give_up_with_store_error(moto_server: str, bucket: str, raw: Any) -> None:
    flaky = FlakyClient(raw, put_object=[client_error("InternalError", 500, "PutObject")] * 5)
    store = S3Store(bucket, client=flaky, attempts=3)
    with pytest.raises(StoreError, match="after 3 attempts") as caught:
        store.put("k", b"x")
    assert bucket in str(caught.value)
    assert flaky.calls["put_object"] == 3


def test_other_client_errors_are_not_retried(moto_server: str, bucket: str, raw: Any) -> None:
    flaky = FlakyClient(raw, get_object=[client_error("AccessDenied", 403)])
    store = S3Store(bucket, client=flaky, attempts=3)
    with pytest.raises(StoreError, match="denied") as caught:
        store.get("k")
    assert bucket in str(caught.value)
    assert flaky.calls["get_object"] == 1


def test_list_with_prefixes(moto_server: str, bucket: str, raw: Any) -> None:
    whole = S3Store(bucket, "", endpoint_url=moto_server)
    objects = S3Store(bucket, "objects", endpoint_url=moto_server)
    sibling = S3Store(bucket, "objects2", endpoint_url=moto_server)
    objects.put("k1/a", b"12345")
    objects.put("k1/b", b"")
    objects.put("k2/a", b"xy")
    sibling.put("k1/a", b"other")
    whole.put("top", b"t")
    # Not valid keys: left out of listings.
    raw.put_object(Bucket=bucket, Key="objects/.hidden", Body=b"")
    raw.put_object(Bucket=bucket, Key="objects/dir/", Body=b"")

    assert [(i.key, i.size) for i in objects.list()] == [
        ("k1/a", 5),
        ("k1/b", 0),
        ("k2/a", 2),
    ]
    assert [i.key for i in objects.list("k1/")] == ["k1/a", "k1/b"]
    assert [i.key for i in objects.list("k")] == ["k1/a", "k1/b", "k2/a"]
    assert list(objects.list("nothing/")) == []
    assert [i.key for i in sibling.list()] == ["k1/a"]
    assert [i.key for i in whole.list()] == [
        "objects/k1/a",
        "objects/k1/b",
        "objects/k2/a",
        "objects2/k1/a",
        "top",
    ]
    assert [i.key for i in whole.list("objects/")] == [
        "objects/k1/a",
        "objects/k1/b",
        "objects/k2/a",
    ]
    assert whole.get("objects/k1/a") == b"12345"
    objects.delete("k1/a")
    objects.delete("k1/a")
    assert [i.key for i in objects.list()] == ["k1/b", "k2/a"]


class SmallPages:
    """Delegates to a real client, but its ``list_objects_v2`` paginator asks for pages of
    two objects."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_paginator(self, operation: str) -> Any:
        paginator = self._client.get_paginator(operation)

        class Paginator:
            def paginate(self, **kwargs: Any) -> Any:
                return paginator.paginate(**kwargs, PaginationConfig={"PageSize": 2})

        return Paginator()


def test_list_pages_through_many_objects(bucket: str, raw: Any) -> None:
    pages = SmallPages(raw)
    store = S3Store(bucket, "many", client=pages)
    keys = [f"o{n}" for n in range(7)]
    for key in reversed(keys):
        store.put(key, key.encode())
    assert [(i.key, i.size) for i in store.list()] == [(k, len(k)) for k in keys]
    assert [i.key for i in store.list("o")] == keys
