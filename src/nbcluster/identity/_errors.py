"""What an identity source raises when "this principal" or "not my token" is not the answer.

A source that asks another service (JupyterHub) can fail to get an answer; saying "not my
token" then would tell the caller their valid token is invalid, so it raises
:class:`IdentitySourceUnavailable` and the gateway answers 503 naming the service. A source
that recognises a token and still refuses it says why with :class:`TokenRefused` (403 with
the reason), so that a user whose Hub role lacks a scope is told which one."""

from __future__ import annotations

__all__ = ["IdentitySourceUnavailable", "TokenRefused"]


class IdentitySourceUnavailable(Exception):
    """The source could not decide; the message names the service and what went wrong (never
    the token). Not cached: the next request asks again."""


class TokenRefused(Exception):
    """The token is the source's and belongs to someone, who may not use the gateway; the
    message says why (for the caller, who holds the token: it may name its owner)."""
