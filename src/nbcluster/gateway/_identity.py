"""The gateway's identities: the admin token, the users file, kernel tokens, the join token
and (when configured) JupyterHub, as one :class:`GatewayIdentity` the auth middleware asks
for each request.

Its two secrets live in the state directory, owner-readable only, made at the first start: the
``secret`` kernel tokens are derived from (so a restarted gateway accepts the tokens its
kernels hold) and the ``join-token`` of host daemons (unless the operator gives one)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from ..identity import (
    JOIN_TOKEN_PREFIX,
    AdminToken,
    Authenticator,
    Chain,
    HubAuthenticator,
    JoinToken,
    KernelTokenAuthenticator,
    KernelTokens,
    Principal,
    Quotas,
    UsersFile,
    UsersFileAuthenticator,
    UsersFileError,
    new_token,
)
from ._config import GatewayConfig

__all__ = ["GatewayIdentity", "join_token_path", "read_or_make_secret"]

log = logging.getLogger(__name__)


def join_token_path(state_dir: Path) -> Path:
    return state_dir / "join-token"


def read_or_make_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``, or a new one written there (0600 from its first byte)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; its mode is now 600", path)
        return text
    path.parent.mkdir(parents=True, exist_ok=True)
    text = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return text


class GatewayIdentity:
    """Built by the gateway; ``owner_of`` gives a live kernel's owner (None: no such kernel),
    so that a kernel token dies with its kernel."""

    def __init__(
        self,
        config: GatewayConfig,
        owner_of: Callable[[str], str | None],
        extra_sources: list[Authenticator] | None = None,
    ) -> None:
        self.config = config
        self.users = UsersFile(config.users_file or config.state_dir / "users.json")
        secret = read_or_make_secret(config.state_dir / "secret", lambda: secrets.token_hex(32))
        self.kernel_tokens = KernelTokens(bytes.fromhex(secret))
        self.join_token = config.join_token or read_or_make_secret(
            join_token_path(config.state_dir), lambda: new_token(JOIN_TOKEN_PREFIX)
        )
        #: Users' JupyterHub tokens (None: not configured). Last of the built-in sources, so
        #: the Hub is asked only about tokens none of the others knows.
        self.hub: HubAuthenticator | None = None
        if config.hub_api_url:
            self.hub = HubAuthenticator(
                config.hub_api_url,
                config.hub_service_name,
                admin_is_admin=config.hub_admin_is_admin,
                cache_seconds=config.hub_cache_seconds,
            )
            log.info("JupyterHub users' tokens are accepted: %s", self.hub.describe())
        self.authenticator = Chain(
            [
                AdminToken(config.token, config.admin_name),
                UsersFileAuthenticator(self.users),
                KernelTokenAuthenticator(self.kernel_tokens, owner_of),
                JoinToken(self.join_token),
                *([self.hub] if self.hub is not None else []),
                *(extra_sources or []),
            ]
        )

    async def authenticate(self, token: str) -> Principal | None:
        return await self.authenticator.authenticate(token)

    async def aclose(self) -> None:
        """Close the connections to JupyterHub (the gateway's stop)."""
        if self.hub is not None:
            await self.hub.aclose()

    def quotas_of(self, user: str) -> Quotas:
        """A user's quotas (the admin token's user and unknown users: none; a users file that
        cannot be read: none, and the authenticator says so)."""
        try:
            record = self.users.get(user)
        except UsersFileError:
            return Quotas()
        return record.quotas if record is not None else Quotas()
