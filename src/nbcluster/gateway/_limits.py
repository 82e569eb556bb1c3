"""Caps on what a client sends the gateway's HTTP API: request bodies (by size, and by how long
they may stop arriving), as ASGI middleware in front of every handler.

A body over its limit is refused before it is buffered: a ``Content-Length`` over the limit is
answered 413 at once, without reading anything; a body without one (chunked) or one that lies
is counted as the app reads it, and the read that crosses the limit raises
:class:`RequestTooLarge`, which the app answers 413 through the error table. Either way the
response says ``connection: close``, so the server stops reading the rest. The limits and
their settings are in ``docs/security.md`` ("Limits").
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import NbclusterError, RequestTimedOut, RequestTooLarge
from ._http import error_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """Refuses request bodies over ``limit`` bytes (``upload_limit`` for a ``POST`` to one of
    ``upload_paths``) with 413, and bodies that stop arriving for ``body_timeout`` seconds
    with 408."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        upload_limit: int,
        upload_paths: Collection[str] = (),
        body_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_paths = frozenset(upload_paths)
        self.body_timeout = body_timeout

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        """The body limit of this request and the setting that gives it."""
        if scope.get("method") == "POST" and scope.get("path") in self.upload_paths:
            return self.upload_limit, "max_upload_bytes"
        return self.limit, "max_body_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, RequestTooLarge(_too_large(declared, limit, setting, "declares")))
            return
        received = 0
        complete = False
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete, refused
            if complete:
                return await receive()  # after the body: only a disconnect, whenever it comes
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                refused = True
                raise RequestTimedOut(
                    f"the request body stopped arriving for {self.body_timeout:g} s (body_timeout)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
                if received > limit:
                    refused = True
                    raise RequestTooLarge(_too_large(received, limit, setting, "sent"))
            else:
                complete = True  # http.disconnect
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if refused:
                    # Do not read the rest of a refused body: close after the answer.
                    headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        except (RequestTooLarge, RequestTimedOut) as exc:
            # Raised where no handler turned it into a response (e.g. a middleware read).
            if started:
                raise
            await _refuse(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(size: int, limit: int, setting: str, verb: str) -> str:
    return (
        f"the request body {verb} {size} bytes, over the limit of {limit} bytes ({setting})"
        if verb == "declares"
        else f"the request body is over the limit of {limit} bytes ({setting})"
    )


async def _refuse(send: Send, exc: NbclusterError) -> None:
    response = error_response(exc.status, str(exc), exc.reason)
    response.headers["connection"] = "close"
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
