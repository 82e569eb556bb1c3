"""The notices in a Redis stream, when the gateway runs with ``--redis``: they outlive a
gateway restart (the new gateway's ring starts from them) and other tools can ``XREAD`` them.

Blocking client calls: the gateway's notifier runs them in a worker thread."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from .._redis import connect
from ._notice import ClusterNotice

__all__ = ["RedisNoticeLog"]

#: The stream's key, with the job store's ``nbcluster:`` prefix.
STREAM_KEY = "nbcluster:notices"


class RedisNoticeLog:
    """Appends notices to a capped stream and reads back the latest."""

    def __init__(self, url: str, capacity: int, key: str | None = None) -> None:
        """``url`` is the gateway's ``--redis`` URL; its ``?prefix=`` (the job store's key
        prefix, so that gateways sharing a server keep apart) also prefixes the stream's key
        (``{prefix}notices``) and is not a client setting."""
        parts = urlsplit(url)
        prefix = parse_qs(parts.query).get("prefix", [None])[-1]
        self._client = connect(parts._replace(query="").geturl())
        self._capacity = capacity
        self._key = key or (STREAM_KEY if prefix is None else f"{prefix}notices")

    def append(self, notices: list[ClusterNotice]) -> None:
        """Raises ``redis.RedisError`` when the server cannot be reached."""
        pipe = self._client.pipeline(transaction=False)
        for notice in notices:
            pipe.xadd(
                self._key,
                {"notice": notice.model_dump_json()},
                maxlen=self._capacity,
                approximate=True,
            )
        pipe.execute()

    def latest(self) -> list[ClusterNotice]:
        """The newest ``capacity`` notices, oldest first (unreadable entries are skipped)."""
        entries = self._client.xrevrange(self._key, count=self._capacity)
        found: list[ClusterNotice] = []
        for _id, fields in reversed(entries or []):
            raw = None if fields is None else fields.get(b"notice")
            if raw is None:
                continue
            try:
                found.append(ClusterNotice.model_validate_json(raw))
            except ValidationError:
                continue  # written by another version: not worth failing the start for
        return found

    def close(self) -> None:
        self._client.close()
