"""Tokens: how they are made, stored (digests only) and checked, and the kernel-scoped tokens
the gateway derives for each kernel without storing them.

Every token is 32 random bytes (``secrets.token_urlsafe``) behind a prefix naming its kind, so
a leaked token says what it is and scanners can find it. Users' tokens are kept as SHA-256
digests: with 256 bits of entropy there is nothing to brute-force, so a slow salted hash would
only cost every request (GitHub keeps its tokens the same way)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "JOIN_TOKEN_PREFIX",
    "KERNEL_TOKEN_PREFIX",
    "USER_TOKEN_PREFIX",
    "KernelTokens",
    "new_token",
    "token_digest",
    "tokens_equal",
]

USER_TOKEN_PREFIX = "nbu_"
KERNEL_TOKEN_PREFIX = "nbk_"
JOIN_TOKEN_PREFIX = "nbj_"


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison (the time of a wrong guess says nothing about the token)."""
    return hmac.compare_digest(given.encode(), expected.encode())


class KernelTokens:
    """Issues and checks the token a kernel's replicas hold (``NBCLUSTER_GATEWAY_TOKEN``).

    A kernel token is ``nbk_<kernel id>.<HMAC of the id under the gateway's secret>``: the
    gateway checks it without keeping a table, and it dies with the kernel (the gateway only
    accepts it while the kernel exists). Called by the gateway when it starts a replica
    (``issue``) and by the authenticator for each request (``kernel_of``)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the kernel-token secret must be at least 32 bytes")
        self._secret = secret

    def _mac(self, kernel_id: str) -> str:
        return hmac.new(self._secret, b"kernel-token:" + kernel_id.encode(), "sha256").hexdigest()

    def issue(self, kernel_id: str) -> str:
        return f"{KERNEL_TOKEN_PREFIX}{kernel_id}.{self._mac(kernel_id)}"

    def kernel_of(self, token: str) -> str | None:
        """The kernel id the token was issued for, or None if it is not an authentic one."""
        if not token.startswith(KERNEL_TOKEN_PREFIX):
            return None
        kernel_id, dot, mac = token[len(KERNEL_TOKEN_PREFIX) :].rpartition(".")
        if not dot or not kernel_id:
            return None
        return (
            kernel_id if hmac.compare_digest(mac.encode(), self._mac(kernel_id).encode()) else None
        )
