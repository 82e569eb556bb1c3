"""Choosing a backend by URL: ``file:///dir``, ``redis://host:port/db?prefix=p``,
``s3://bucket/prefix?endpoint_url=http://...``.

``nbcluster up --store URL`` and ``nbcluster gateway --store URL`` take one; the gateway hands
it to every replica (``NBCLUSTER_STORE_URL``), and ``nbcluster store`` opens it for operators.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ._interface import ObjectStore
from ._local import LocalDirectoryStore

__all__ = ["open_store", "store_url_for_directory"]


def store_url_for_directory(path: Path) -> str:
    return Path(path).resolve().as_uri()


def open_store(url: str) -> ObjectStore:
    """The store a URL names. Raises ``ValueError`` naming what is wrong with the URL (an
    unknown scheme, a missing bucket, an unknown option)."""
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url!r}: a file URL names a local path (file:///dir)")
        if options:
            raise ValueError(f"store URL {url!r}: file stores take no options")
        path = unquote(parts.path)
        if not path:
            raise ValueError(f"store URL {url!r}: no directory given")
        return LocalDirectoryStore(path)
    if scheme in ("redis", "rediss", "unix"):
        from ._redis import RedisStore

        prefix = options.pop("prefix", "nbcluster/")
        chunk = options.pop("chunk_mb", None)
        if options:
            raise ValueError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(options))}")
        base = parts._replace(query="").geturl()
        kwargs = {"chunk_size": int(float(chunk) * 2**20)} if chunk else {}
        return RedisStore.from_url(base, prefix=prefix, **kwargs)
    if scheme == "s3":
        from ._s3 import S3Store

        bucket = parts.netloc
        if not bucket:
            raise ValueError(f"store URL {url!r}: no bucket (s3://bucket/prefix)")
        prefix = parts.path.lstrip("/")
        endpoint = options.pop("endpoint_url", None)
        region = options.pop("region", None)
        if options:
            raise ValueError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(options))}")
        return S3Store(bucket, prefix, endpoint_url=endpoint, region=region)
    if scheme in ("hdfs", "webhdfs"):
        raise ValueError(
            f"store URL {url!r}: HDFS is not supported: no HDFS client library installs from "
            "the package registries without a Java Hadoop runtime (see docs/store.md)"
        )
    raise ValueError(f"store URL {url!r}: unknown scheme {parts.scheme!r}; use file, redis or s3")
