"""Token authentication for every HTTP and websocket endpoint, the Jupyter way:
``Authorization: token T`` (or ``Bearer T``) or ``?token=T``.

Missing credentials get 401, wrong ones 403; a websocket is refused before it is accepted
(the server answers the handshake with 403).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["TokenAuthMiddleware", "extract_token"]


def extract_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, credentials = text.partition(" ")
            if scheme.lower() in ("token", "bearer") and credentials.strip():
                return credentials.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return str(values[0]) if values else None


class TokenAuthMiddleware:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = extract_token(scope)
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send(
                {"type": "websocket.close", "code": 1008, "reason": "invalid or missing token"}
            )
            return
        status = 401 if given is None else 403
        reason = "missing token" if given is None else "invalid token"
        body = json.dumps(
            {
                "message": f"{reason}: send 'Authorization: token <token>' or ?token=<token>",
                "reason": reason,
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"token"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
