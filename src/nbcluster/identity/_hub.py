"""JupyterHub as an identity source: the gateway is registered as a Hub service and accepts the
Hub API token that each user's single-user server already holds (``JUPYTERHUB_API_TOKEN``),
so a Hub's servers point ``--gateway-url`` at nbcluster and each user is themselves.

A token is checked the way JupyterHub's own ``HubAuth`` checks one for a service
(``jupyterhub/services/auth.py``, JupyterHub >= 2): ``GET {api_url}/user`` with
``Authorization: token <the token>`` answers the owner's model with the token's expanded
``scopes`` (403: not a live Hub token), and the token may use the service when those scopes
include ``access:services!service=<name>`` or ``access:services`` (HubAuth's default
``access_scopes``). Unlike HubAuth, only users' tokens are accepted: a Hub service has a
name of its own, which could equal a user's and so reach that user's kernels.

Answers are cached by the token's SHA-256, never the token: a user's for ``cache_seconds``
(so a revoked token keeps working that long), a refusal briefly, an unreachable Hub not at
all (:class:`IdentitySourceUnavailable`, a 503 at the gateway). Concurrent requests with the
same uncached token share one Hub request: JupyterLab opens many at once."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._errors import IdentitySourceUnavailable, TokenRefused
from ._principal import Principal
from ._tokens import JOIN_TOKEN_PREFIX, KERNEL_TOKEN_PREFIX, USER_TOKEN_PREFIX, token_digest
from ._users import validate_user_name

__all__ = [
    "HUB_API_URL_ENV",
    "HUB_SERVICE_NAME_ENV",
    "HubAuthenticator",
    "check_api_url",
    "hub_settings_from_env",
]

log = logging.getLogger(__name__)

#: What JupyterHub sets for a service it manages (``c.JupyterHub.services`` with a
#: ``command``). JupyterHub's names, not nbcluster's, so not in ``nbcluster.envvars``.
HUB_API_URL_ENV = "JUPYTERHUB_API_URL"
HUB_SERVICE_NAME_ENV = "JUPYTERHUB_SERVICE_NAME"

#: nbcluster's own tokens are never sent to the Hub (the Hub's operator need not see them).
_OWN_PREFIXES = (USER_TOKEN_PREFIX, KERNEL_TOKEN_PREFIX, JOIN_TOKEN_PREFIX)
#: Hub tokens are 32 hex characters; anything that could not go in a header is not one.
_PLAUSIBLE = re.compile(r"[!-~]{8,1024}")

#: Accepted (a principal), refused (why), or not a Hub token (None).
_Verdict = Principal | str | None


def hub_settings_from_env(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The Hub API URL and service name when the gateway runs as a Hub-managed service.

    Both must be set: a single-user server (where someone might run ``nbcluster up``) has
    ``JUPYTERHUB_API_URL`` but no service name, and must not turn Hub tokens on by accident."""
    url = environ.get(HUB_API_URL_ENV) or None
    name = environ.get(HUB_SERVICE_NAME_ENV) or None
    return (url, name) if url and name else (None, None)


def check_api_url(url: str) -> str:
    """``url`` without its trailing slash; ValueError unless it is an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"{url!r} is not JupyterHub's API URL: expected http(s)://HOST:PORT/hub/api"
        )
    return url.rstrip("/")


class _VerdictCache:
    """Verdicts by token digest, each until its deadline; the least recently used go first
    past ``size``."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, _Verdict]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, _Verdict]:
        """(found, verdict)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        deadline, verdict = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, verdict

    def put(self, key: str, verdict: _Verdict, seconds: float) -> None:
        if seconds <= 0:
            return
        self._entries[key] = (self._clock() + seconds, verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class HubAuthenticator:
    """Users' JupyterHub API tokens, checked against the Hub at ``api_url``
    (``http://hub:8081/hub/api``) for access to the service ``service_name``.

    Hub admins are nbcluster admins unless ``admin_is_admin`` is False. ``client``: the
    HTTP client to use (tests pass one with a fake transport); by default one is made at the
    first request and closed by :meth:`aclose`."""

    def __init__(
        self,
        api_url: str,
        service_name: str = "nbcluster",
        *,
        admin_is_admin: bool = True,
        cache_seconds: float = 60.0,
        negative_cache_seconds: float = 5.0,
        cache_size: int = 10_000,
        timeout: float = 5.0,
        max_concurrent: int = 32,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_url = check_api_url(api_url)
        self.service_name = service_name
        #: The scopes any one of which lets a token use this service (HubAuth's default).
        self.access_scopes = frozenset(
            {"access:services", f"access:services!service={service_name}"}
        )
        self.admin_is_admin = admin_is_admin
        self.cache_seconds = cache_seconds
        self.negative_cache_seconds = negative_cache_seconds
        self._cache = _VerdictCache(cache_size, clock)
        self._timeout = timeout
        self._client = client
        self._own_client = client is None
        # Bounds what a flood of made-up tokens can make the gateway ask of the Hub.
        self._limit = asyncio.Semaphore(max_concurrent)
        self._inflight: dict[str, asyncio.Future[_Verdict]] = {}

    def describe(self) -> str:
        return f"JupyterHub at {self.api_url} (service {self.service_name!r})"

    async def authenticate(self, token: str) -> Principal | None:
        if token.startswith(_OWN_PREFIXES) or not _PLAUSIBLE.fullmatch(token):
            return None
        key = token_digest(token)
        found, verdict = self._cache.get(key)
        if not found:
            verdict = await self._shared_lookup(key, token)
        if isinstance(verdict, str):
            raise TokenRefused(verdict)
        return verdict

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- asking the Hub ---------------------------------------------------------------------

    async def _shared_lookup(self, key: str, token: str) -> _Verdict:
        """One Hub request per uncached token however many requests carry it at once."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._lookup(key, token))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._lookup_done(key, done))
        # A waiter that goes away (its client disconnected) must not cancel the others'.
        return await asyncio.shield(future)

    def _lookup_done(self, key: str, future: asyncio.Future[_Verdict]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone

    async def _lookup(self, key: str, token: str) -> _Verdict:
        async with self._limit:
            model = await self._whoami(token)
        verdict = None if model is None else self._judge(model)
        if isinstance(verdict, Principal):
            self._cache.put(key, verdict, self.cache_seconds)
            log.debug("JupyterHub token sha256:%s… is %s", key[:8], verdict.describe())
        else:
            self._cache.put(key, verdict, self.negative_cache_seconds)
            if verdict is not None:
                log.info("JupyterHub token sha256:%s… refused: %s", key[:8], verdict)
        return verdict

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        return self._client

    async def _whoami(self, token: str) -> dict[str, Any] | None:
        """The token owner's model, or None when the Hub does not know the token."""
        url = f"{self.api_url}/user"
        try:
            # httpx's timeout bounds each read; this bounds the whole answer (a Hub that
            # trickles bytes must not hold the request, and every one waiting on it).
            async with asyncio.timeout(self._timeout):
                response = await self._http().get(
                    url, headers={"Authorization": f"token {token}"}, timeout=self._timeout
                )
        except TimeoutError:
            raise self._unavailable(f"did not answer within {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise self._unavailable(f"did not answer ({type(exc).__name__}: {exc})") from None
        status = response.status_code
        # 403 is how the Hub answers an unknown, expired or revoked token on /user (HubAuth
        # reads it the same way); 401 for proxies in front of it that say so.
        if status in (401, 403):
            return None
        if status == 404:
            raise self._unavailable(
                f"has no {url} (404): is the API URL right? It ends in /hub/api"
            )
        if status != 200:
            raise self._unavailable(f"answered {status} to GET {url}")
        try:
            model = response.json()
        except ValueError:
            model = None
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise self._unavailable(f"answered GET {url} with something other than a user model")
        return model

    def _unavailable(self, what: str) -> IdentitySourceUnavailable:
        message = f"cannot check the token: {self.describe()} {what}"
        log.warning("%s", message)
        return IdentitySourceUnavailable(message)

    def _judge(self, model: Mapping[str, Any]) -> Principal | str:
        """The principal a Hub model stands for, or why it may not use the gateway."""
        name = model["name"]
        kind = model.get("kind", "user")
        if kind != "user":
            return (
                f"the token is JupyterHub {kind} {name!r}'s: the gateway accepts users' tokens only"
            )
        scopes = model.get("scopes")
        held = {s for s in scopes if isinstance(s, str)} if isinstance(scopes, list) else set()
        if not held & self.access_scopes:
            return (
                f"JupyterHub user {name!r}'s token lacks the scope "
                f"access:services!service={self.service_name}: the Hub's operator grants it to "
                "users and their servers' tokens (docs/security.md, 'JupyterHub')"
            )
        try:
            validate_user_name(name)
        except ValueError as exc:
            return f"JupyterHub user {name!r} cannot use the gateway: {exc}"
        admin = self.admin_is_admin and model.get("admin") is True
        return Principal(role="admin" if admin else "user", user=name)
