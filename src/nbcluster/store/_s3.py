"""An object store in an S3 bucket (AWS, or anything that speaks the S3 API: MinIO, Ceph...).

:func:`~nbcluster.store.open_store` builds one for ``s3://bucket/prefix?endpoint_url=...``;
kernel replicas then call ``put``/``get`` for large values and ``nbcluster store`` calls
``list``/``delete`` for housekeeping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import xxhash
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from ._interface import (
    ObjectCorruptedError,
    ObjectInfo,
    ObjectNotFoundError,
    StoreError,
    validate_key,
)
from ._retry import retrying

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["S3Store"]

T = TypeVar("T")

#: The user metadata key (``x-amz-meta-nbcluster-xxh3-128``) holding the hex XXH3-128 digest
#: of the object's data; ``get`` verifies it.
DIGEST_METADATA = "nbcluster-xxh3-128"
#: Objects larger than this go up as a multipart upload (a single PUT takes at most 5 GB).
MULTIPART_THRESHOLD = 256 * 2**20
#: The size of each part of a multipart upload (S3: at least 5 MiB, at most 10,000 parts).
PART_SIZE = 64 * 2**20
_MIN_PART_SIZE = 5 * 2**20
_MAX_PARTS = 10_000

#: S3 error codes that mean "try again later" (besides any 5xx status).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)


class _TransientClientError(Exception):
    """A :class:`ClientError` worth retrying (5xx status, throttling, a request timeout)."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


#: What :func:`retrying` retries: connection failures (refused, unreachable, connect timeout),
#: broken or timed-out responses, a body cut short or garbled in transit, transient S3 errors.
_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    FlexibleChecksumError,
    _TransientClientError,
)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_transient(error: ClientError) -> bool:
    return _code(error) in _TRANSIENT_CODES or _status(error) >= 500


def _digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class S3Store:
    """:class:`~nbcluster.store.ObjectStore` keeping each object as one S3 object named
    ``{prefix}/{key}`` in ``bucket`` (just ``{key}`` when ``prefix`` is empty).

    * Credentials come from the standard boto3 chain (``AWS_ACCESS_KEY_ID``/... in the
      environment, ``~/.aws`` config files, instance or container roles); the region from
      ``region`` or that chain. ``endpoint_url`` points at a non-AWS S3 service.
    * Writes are atomic: an object goes up in one ``PutObject`` (S3 makes it visible whole, or
      not at all), or, above ``multipart_threshold`` bytes, as a multipart upload that is
      completed only once every part is up (an incomplete upload is invisible) and aborted if
      anything fails.
    * Each object carries the XXH3-128 digest of its data in its user metadata
      (``nbcluster-xxh3-128``), verified on every ``get``: altered bytes, or an object that
      nbcluster did not write, raise :class:`~nbcluster.store.ObjectCorruptedError`.
    * Transient failures (connection refused or reset, timeouts, 5xx, ``SlowDown``) are retried
      by botocore per request (``request_attempts``, standard mode) and the whole operation
      again with backoff (``attempts``) before a :class:`~nbcluster.store.StoreError` naming
      the bucket and endpoint. A missing bucket or denied access fails at once.
    * Safe to call from several threads (one boto3 client, which is thread-safe).

    ``client`` replaces the boto3 client built here (tests); the timeout and retry options then
    do not apply.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any | None = None,
        attempts: int = 3,
        request_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        upload_threads: int = 4,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket name")
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes (S3's minimum)")
        if attempts < 1 or request_attempts < 1 or upload_threads < 1:
            raise ValueError("attempts, request_attempts and upload_threads must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.upload_threads = upload_threads
        if client is None:
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": request_attempts, "mode": "standard"},
                max_pool_connections=max(10, 2 * upload_threads),
            )
            try:
                client = boto3.session.Session().client(
                    "s3", endpoint_url=endpoint_url, region_name=region, config=config
                )
            except (BotoCoreError, ValueError) as exc:
                raise StoreError(
                    f"cannot open the S3 store s3://{bucket}/{self.prefix} "
                    f"(endpoint {endpoint_url or 'AWS default'}): {exc}"
                ) from exc
        self._client: S3Client = client
        self.endpoint_url: str = endpoint_url or str(self._client.meta.endpoint_url)

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={self.endpoint_url!r})"
        )

    def close(self) -> None:
        """Close the client's connections (the store is unusable afterwards)."""
        self._client.close()

    # -- naming ---------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint_url}"

    # -- error handling -------------------------------------------------------------------

    def _run(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` under :func:`retrying`, every failure turned into a :class:`StoreError`
        whose message says ``what`` failed and where (``what`` names the operation and key)."""

        def attempt() -> T:
            try:
                return call()
            except ClientError as exc:
                if _is_transient(exc):
                    raise _TransientClientError(exc) from exc
                raise

        where = f"{what} in {self._where()}"
        try:
            return retrying(where, attempt, _TRANSIENT, attempts=self.attempts)
        except StoreError:
            raise
        except ClientError as exc:
            raise self._client_error(where, exc) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"{where} failed: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, configure ~/.aws, or run with an instance role"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"{where} failed: {exc}") from exc

    def _client_error(self, where: str, exc: ClientError) -> StoreError:
        code = _code(exc)
        if code == "NoSuchBucket":
            return StoreError(
                f"{where} failed: the bucket {self.bucket!r} does not exist at {self.endpoint_url}"
            )
        if code in _DENIED_CODES or _status(exc) == 403:
            return StoreError(
                f"{where} failed: access to the bucket {self.bucket!r} at {self.endpoint_url} "
                f"was denied ({code or 'HTTP 403'}); check the credentials and bucket policy"
            )
        return StoreError(f"{where} failed: {exc}")

    # -- the ObjectStore calls ------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (kernel replicas, for values too large for the log)."""
        name = self._name(key)
        if not isinstance(data, bytes):
            data = bytes(data)
        metadata = {DIGEST_METADATA: _digest(data)}
        if len(data) > self.multipart_threshold:
            self._put_multipart(key, name, data, metadata)
            return
        self._run(
            f"put of {key!r}",
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=name, Body=data, Metadata=metadata
            ),
        )

    def _put_multipart(self, key: str, name: str, data: bytes, metadata: dict[str, str]) -> None:
        what = f"multipart put of {key!r}"
        part_size = max(self.part_size, math.ceil(len(data) / _MAX_PARTS))
        upload_id = self._run(
            what,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=name, Metadata=metadata
            )["UploadId"],
        )
        try:
            view = memoryview(data)
            offsets = range(0, len(data), part_size)

            def upload(number: int, start: int) -> CompletedPartTypeDef:
                body = bytes(view[start : start + part_size])
                response = self._run(
                    f"{what} (part {number})",
                    lambda: self._client.upload_part(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    ),
                )
                return {"ETag": response["ETag"], "PartNumber": number}

            with ThreadPoolExecutor(
                max_workers=min(self.upload_threads, len(offsets)),
                thread_name_prefix="nbcluster-s3-upload",
            ) as pool:
                futures = [
                    pool.submit(upload, number, start)
                    for number, start in enumerate(offsets, start=1)
                ]
                try:
                    parts = [future.result() for future in futures]
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
            self._complete(what, name, upload_id, parts, metadata[DIGEST_METADATA])
        except BaseException:
            # Never leave the parts behind (they cost storage until a lifecycle rule runs).
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                )
            raise

    def _complete(
        self,
        what: str,
        name: str,
        upload_id: str,
        parts: list[CompletedPartTypeDef],
        digest: str,
    ) -> None:
        tried = False

        def complete() -> None:
            nonlocal tried
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except ClientError as exc:
                # A retry after a lost response finds the upload already completed.
                if tried and _code(exc) == "NoSuchUpload":
                    head = self._client.head_object(Bucket=self.bucket, Key=name)
                    if head.get("Metadata", {}).get(DIGEST_METADATA) == digest:
                        return
                raise
            finally:
                tried = True

        self._run(what, complete)

    def get(self, key: str) -> bytes:
        """The bytes under ``key`` (kernel replicas, resolving a pointer from the log)."""
        name = self._name(key)

        def fetch() -> bytes:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    raise ObjectNotFoundError(key) from None
                raise
            body = response["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            expected = response.get("Metadata", {}).get(DIGEST_METADATA)
            if expected is None:
                raise ObjectCorruptedError(
                    key,
                    f"s3://{self.bucket}/{name} has no checksum (no '{DIGEST_METADATA}' "
                    "metadata): it was not written by nbcluster",
                )
            if _digest(data) != expected.lower():
                raise ObjectCorruptedError(key, f"checksum mismatch in s3://{self.bucket}/{name}")
            return data

        return self._run(f"get of {key!r}", fetch)

    def delete(self, key: str) -> None:
        """Remove ``key``'s object, if any (``nbcluster store gc``, kernel cleanup)."""
        name = self._name(key)
        self._run(
            f"delete of {key!r}",
            lambda: self._client.delete_object(Bucket=self.bucket, Key=name),
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key (``nbcluster store
        ls|du|gc``). S3 objects under the store's prefix whose names are not valid keys (put
        there by other tools) are left out."""
        base = f"{self.prefix}/" if self.prefix else ""

        def collect() -> list[ObjectInfo]:
            found = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", []):
                    name = item.get("Key", "")
                    key = name[len(base) :]
                    if not name.startswith(base):
                        continue
                    try:
                        validate_key(key)
                    except ValueError:
                        continue
                    found.append(ObjectInfo(key, int(item.get("Size", 0))))
            return sorted(found, key=lambda info: info.key)

        return iter(self._run(f"list of {prefix!r}", collect))
