"""What the two Redis-backed stores share (the object store's ``RedisStore`` and the job
store's ``RedisJobStore``): how a client is made, which errors are worth retrying, and how a
server is named in messages without its credentials."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["TRANSIENT_ERRORS", "connect", "describe"]

#: Errors after which the same command may well succeed: retried with backoff by the stores.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
)


def connect(url: str, **options: Any) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``) that gives up on a silent
    server after 30 s (10 s to connect) and leaves retries to its caller, so that a dead server
    is reported after a bounded time. ``options`` add to or override the client's settings."""
    settings: dict[str, Any] = {
        "socket_timeout": 30.0,
        "socket_connect_timeout": 10.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
    }
    return redis.Redis.from_url(url, **(settings | options))


def describe(client: redis.Redis) -> str:
    """Where the server is, as a URL without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    connection_class = client.connection_pool.connection_class
    scheme = "rediss" if issubclass(connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
