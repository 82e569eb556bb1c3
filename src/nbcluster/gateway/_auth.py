"""Authentication and role checks for every HTTP and websocket endpoint, the Jupyter way:
``Authorization: token T`` (or ``Bearer T``) or ``?token=T``.

The token becomes a :class:`~nbcluster.identity.Principal` (``scope["state"]["principal"]``,
``request.state.principal`` in handlers); its role must be allowed on the route
(``identity.ROUTE_RULES``). Missing credentials get 401, unknown ones 403, a role not allowed
403 naming the role, a token its source refuses 403 with the reason (a Hub user lacking the
access scope), and a token that cannot be checked (JupyterHub down) 503 naming the source; a
websocket is refused before it is accepted (close 1008).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from ..identity import (
    IdentitySourceUnavailable,
    Principal,
    TokenRefused,
    route_allowed,
    route_is_public,
)
from ._close_reason import close_reason
from ._errors import ApiError

if TYPE_CHECKING:
    from ._identity import GatewayIdentity

__all__ = ["AuthMiddleware", "extract_token", "principal_of"]

log = logging.getLogger(__name__)


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


def principal_of(connection: HTTPConnection) -> Principal:
    """The caller of a request or websocket (set by :class:`AuthMiddleware`)."""
    principal = connection.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # an app built without the middleware
        raise ApiError(401, "the request carries no identity", "missing token")
    return principal


class AuthMiddleware:
    def __init__(self, app: ASGIApp, identity: GatewayIdentity) -> None:
        self.app = app
        self._identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and route_is_public(scope["method"], scope["path"]):
            # A static page or asset that holds no data (``public`` in ROUTE_RULES).
            await self.app(scope, receive, send)
            return
        given = extract_token(scope)
        try:
            principal = None if given is None else await self._identity.authenticate(given)
        except IdentitySourceUnavailable as exc:
            # Not "invalid token": the token may well be good once JupyterHub answers again.
            await _refuse(scope, send, 503, "identity source unavailable", str(exc))
            return
        except TokenRefused as exc:
            await _refuse(scope, send, 403, "forbidden", f"forbidden: {exc}")
            return
        if principal is None:
            reason = "missing token" if given is None else "invalid token"
            await _refuse(
                scope,
                send,
                401 if given is None else 403,
                reason,
                f"{reason}: send 'Authorization: token <token>' or ?token=<token>",
            )
            return
        method = "WS" if scope["type"] == "websocket" else scope["method"]
        path = scope["path"]
        if not route_allowed(principal, method, path):
            await _refuse(
                scope,
                send,
                403,
                "forbidden",
                f"forbidden: {principal.describe()} may not call {method} {path}",
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, reason: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": close_reason(message)})
        return
    body = json.dumps({"message": message, "reason": reason}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"token"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
