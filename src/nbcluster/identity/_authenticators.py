"""Identity sources behind one interface: each turns a token into a :class:`Principal`, or
says it is not one of its tokens (None).

The gateway asks a :class:`Chain` of them for each request (``gateway/_auth.py``): the
operator's admin token, the users file, JupyterHub (``_hub.py``), kernel tokens and the join
token. Token kinds have distinct prefixes, so at most one source recognises a token."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from ._principal import Principal
from ._tokens import KernelTokens, tokens_equal
from ._users import UsersFile, UsersFileError

__all__ = [
    "AdminToken",
    "Authenticator",
    "Chain",
    "JoinToken",
    "KernelTokenAuthenticator",
    "UsersFileAuthenticator",
]


log = logging.getLogger(__name__)


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` stands for; None when it is not this source's token."""
        ...


class AdminToken:
    """The token the operator starts the gateway with (``--token``): the admin user ``name``
    (``nbcluster up`` prints it)."""

    def __init__(self, token: str, name: str = "admin") -> None:
        self._token = token
        self._name = name

    async def authenticate(self, token: str) -> Principal | None:
        if self._token and tokens_equal(token, self._token):
            return Principal(role="admin", user=self._name)
        return None


class UsersFileAuthenticator:
    """A users file that cannot be read (unreadable, bad JSON, readable by others) is logged
    and authenticates nobody; the admin token keeps working, so the operator can fix it."""

    def __init__(self, users: UsersFile) -> None:
        self._users = users
        self._last_error = ""

    async def authenticate(self, token: str) -> Principal | None:
        try:
            user = self._users.find(token)
        except UsersFileError as exc:
            if str(exc) != self._last_error:  # once per problem, not per request
                self._last_error = str(exc)
                log.error("users file: %s; no user token is accepted until it is fixed", exc)
            return None
        self._last_error = ""
        if user is None:
            return None
        return Principal(role="admin" if user.admin else "user", user=user.name)


class KernelTokenAuthenticator:
    """Kernel tokens, accepted only while their kernel exists; ``owner_of`` gives a kernel's
    owner (None: no such kernel)."""

    def __init__(self, tokens: KernelTokens, owner_of: Callable[[str], str | None]) -> None:
        self._tokens = tokens
        self._owner_of = owner_of

    async def authenticate(self, token: str) -> Principal | None:
        kernel_id = self._tokens.kernel_of(token)
        if kernel_id is None:
            return None
        owner = self._owner_of(kernel_id)
        if owner is None:
            return None
        return Principal(role="kernel", user=owner, kernel_id=kernel_id)


class JoinToken:
    """The cluster's join token: host daemons present it, and it is good for nothing else."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def authenticate(self, token: str) -> Principal | None:
        if self._token and tokens_equal(token, self._token):
            return Principal(role="host")
        return None


class Chain:
    """Asks each source in turn; the first that recognises the token decides. A source that
    cannot answer (the Hub is down) raises, and the request is refused with the reason."""

    def __init__(self, sources: Sequence[Authenticator]) -> None:
        self.sources = list(sources)

    async def authenticate(self, token: str) -> Principal | None:
        for source in self.sources:
            principal = await source.authenticate(token)
            if principal is not None:
                return principal
        return None
