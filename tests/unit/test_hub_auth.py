"""JupyterHub as an identity source, against a fake Hub (``httpx.MockTransport``): scopes,
admins, the cache (positive, negative, bounded, keyed by digest), a Hub that is down, and what
the gateway's middleware answers for each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nbcluster.gateway._auth import AuthMiddleware
from nbcluster.gateway._config import GatewayConfig
from nbcluster.gateway._identity import GatewayIdentity
from nbcluster.identity import (
    HubAuthenticator,
    IdentitySourceUnavailable,
    Principal,
    TokenRefused,
    check_api_url,
    hub_settings_from_env,
    new_token,
    token_digest,
)

API = "http://hub.test:8081/hub/api"
ACCESS = "access:services!service=nbcluster"


class FakeHub:
    """Answers ``GET /hub/api/user`` for the tokens it knows; counts the requests."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        #: Set to make every request fail this way (e.g. ``httpx.ConnectError``).
        self.fail: Callable[[httpx.Request], httpx.Response] | None = None
        self.delay = 0.0

    def user(self, name: str, scopes: list[str], admin: bool = False, **extra: Any) -> str:
        token = new_token("")[:32]
        self.models[token] = {"kind": "user", "name": name, "admin": admin, "scopes": scopes}
        self.models[token].update(extra)
        return token

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            return self.fail(request)
        assert request.url.path == "/hub/api/user"
        scheme, _, token = request.headers["authorization"].partition(" ")
        assert scheme == "token"
        model = self.models.get(token)
        if model is None:
            return httpx.Response(403, json={"status": 403, "message": "Forbidden"})
        return httpx.Response(200, json=model)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def authenticator(hub: FakeHub, clock: Clock, **options: Any) -> HubAuthenticator:
    client = httpx.AsyncClient(transport=httpx.MockTransport(hub.handler))
    return HubAuthenticator(API, "nbcluster", client=client, clock=clock, **options)


# -- who a token is ---------------------------------------------------------------------------


async def test_a_users_token_with_the_access_scope_is_that_user(hub: FakeHub, clock: Clock) -> None:
    auth = authenticator(hub, clock)
    token = hub.user("alice", [ACCESS, "users:activity!user=alice"])
    assert await auth.authenticate(token) == Principal(role="user", user="alice")
    [request] = hub.requests
    assert str(request.url) == f"{API}/user"
    assert request.headers["authorization"] == f"token {token}"


async def test_the_unfiltered_access_scope_is_enough(hub: FakeHub, clock: Clock) -> None:
    auth = authenticator(hub, clock)
    assert await auth.authenticate(hub.user("bob", ["access:services"])) == Principal(
        role="user", user="bob"
    )


@pytest.mark.parametrize(
    "scopes",
    [
        [],
        ["access:services!service=other"],
        ["access:servers!server=carol/", "users:activity!user=carol"],
        ["access:services!service=nbcluster-evil"],
    ],
)
async def test_a_token_without_access_to_the_service_is_refused_naming_the_scope(
    hub: FakeHub, clock: Clock, scopes: list[str]
) -> None:
    auth = authenticator(hub, clock)
    with pytest.raises(TokenRefused, match=f"'carol'.* lacks the scope {ACCESS}"):
        await auth.authenticate(hub.user("carol", scopes))


async def test_the_service_name_decides_which_scope_counts(hub: FakeHub, clock: Clock) -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(hub.handler))
    auth = HubAuthenticator(API, "gpu-gateway", client=client, clock=clock)
    assert await auth.authenticate(hub.user("dan", ["access:services!service=gpu-gateway"]))
    with pytest.raises(TokenRefused, match="access:services!service=gpu-gateway"):
        await auth.authenticate(hub.user("erin", [ACCESS]))


async def test_hub_admins_are_admins_unless_configured_otherwise(
    hub: FakeHub, clock: Clock
) -> None:
    token = hub.user("root-of-hub", [ACCESS], admin=True)
    assert await authenticator(hub, clock).authenticate(token) == Principal(
        role="admin", user="root-of-hub"
    )
    plain = authenticator(hub, clock, admin_is_admin=False)
    assert await plain.authenticate(token) == Principal(role="user", user="root-of-hub")


async def test_a_services_token_is_refused_even_with_the_scope(hub: FakeHub, clock: Clock) -> None:
    # A service named like a user would otherwise reach that user's kernels.
    token = hub.user("alice", ["access:services"], kind="service")
    with pytest.raises(TokenRefused, match=r"JupyterHub service 'alice'.*users' tokens only"):
        await authenticator(hub, clock).authenticate(token)


async def test_a_hub_user_name_nbcluster_cannot_hold_is_refused(hub: FakeHub, clock: Clock) -> None:
    with pytest.raises(TokenRefused, match="cannot use the gateway: invalid user name"):
        await authenticator(hub, clock).authenticate(hub.user("a/b c", [ACCESS]))


async def test_an_unknown_token_is_not_a_hub_token(hub: FakeHub, clock: Clock) -> None:
    assert await authenticator(hub, clock).authenticate("0123456789abcdef" * 2) is None


@pytest.mark.parametrize(
    "token",
    [
        # Fixed ids: parallel test workers must collect the same tests.
        pytest.param(new_token("nbu_"), id="user-token"),
        pytest.param(new_token("nbk_"), id="kernel-token"),
        pytest.param(new_token("nbj_"), id="join-token"),
        "short",
        "has space inside it",
        "line\r\nbreak-injection",
        "x" * 2000,
        "naïve-unicode-token",
    ],
)
async def test_nbclusters_own_and_impossible_tokens_never_reach_the_hub(
    hub: FakeHub, clock: Clock, token: str
) -> None:
    assert await authenticator(hub, clock).authenticate(token) is None
    assert hub.requests == []


# -- the cache --------------------------------------------------------------------------------


async def test_an_answer_is_cached_for_cache_seconds_then_asked_again(
    hub: FakeHub, clock: Clock
) -> None:
    auth = authenticator(hub, clock, cache_seconds=60)
    token = hub.user("alice", [ACCESS])
    for _ in range(5):
        assert await auth.authenticate(token) == Principal(role="user", user="alice")
    assert len(hub.requests) == 1
    # Revoked in the Hub: still good until the cached answer expires, then refused.
    del hub.models[token]
    clock.now += 59
    assert await auth.authenticate(token) is not None
    clock.now += 1
    assert await auth.authenticate(token) is None
    assert len(hub.requests) == 2


async def test_refusals_are_cached_briefly(hub: FakeHub, clock: Clock) -> None:
    auth = authenticator(hub, clock, negative_cache_seconds=5)
    unknown = "f" * 32
    unscoped = hub.user("carol", [])
    for _ in range(3):
        assert await auth.authenticate(unknown) is None
        with pytest.raises(TokenRefused):
            await auth.authenticate(unscoped)
    assert len(hub.requests) == 2
    # The operator fixes carol's role: she gets in once the refusal expires.
    hub.models[unscoped]["scopes"] = [ACCESS]
    clock.now += 5
    assert await auth.authenticate(unscoped) == Principal(role="user", user="carol")
    assert len(hub.requests) == 3


async def test_the_cache_is_bounded_and_keyed_by_digest(hub: FakeHub, clock: Clock) -> None:
    auth = authenticator(hub, clock, cache_size=2)
    tokens = [hub.user(f"u{i}", [ACCESS]) for i in range(3)]
    for token in tokens:
        await auth.authenticate(token)
    keys = list(auth._cache._entries)
    assert keys == [token_digest(t) for t in tokens[1:]]
    assert not any(t in repr(auth._cache._entries) for t in tokens)
    await auth.authenticate(tokens[0])  # evicted: asked again
    assert len(hub.requests) == 4


async def test_concurrent_requests_with_one_token_ask_the_hub_once(
    hub: FakeHub, clock: Clock
) -> None:
    hub.delay = 0.05
    auth = authenticator(hub, clock)
    token = hub.user("alice", [ACCESS])
    results = await asyncio.gather(*(auth.authenticate(token) for _ in range(20)))
    assert set(results) == {Principal(role="user", user="alice")}
    assert len(hub.requests) == 1


async def test_a_waiter_that_goes_away_does_not_cancel_the_others(
    hub: FakeHub, clock: Clock
) -> None:
    hub.delay = 0.05
    auth = authenticator(hub, clock)
    token = hub.user("alice", [ACCESS])
    first = asyncio.ensure_future(auth.authenticate(token))
    second = asyncio.ensure_future(auth.authenticate(token))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == Principal(role="user", user="alice")


# -- when the Hub cannot answer ---------------------------------------------------------------


def _refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        (_refuse_connection, "did not answer .*ConnectError"),
        (lambda r: httpx.Response(502, text="bad gateway"), "answered 502"),
        (lambda r: httpx.Response(404), r"404.*ends in /hub/api"),
        (lambda r: httpx.Response(200, text="<html>"), "something other than a user model"),
        (lambda r: httpx.Response(200, json=["a"]), "something other than a user model"),
    ],
)
async def test_a_hub_that_cannot_answer_makes_the_source_unavailable_uncached(
    hub: FakeHub, clock: Clock, fail: Callable[[httpx.Request], httpx.Response], message: str
) -> None:
    auth = authenticator(hub, clock)
    token = hub.user("alice", [ACCESS])
    hub.fail = fail
    with pytest.raises(IdentitySourceUnavailable, match=message) as caught:
        await auth.authenticate(token)
    assert f"JupyterHub at {API}" in str(caught.value)
    assert token not in str(caught.value)
    # Nothing was cached: once the Hub is back, the same token works at once.
    hub.fail = None
    assert await auth.authenticate(token) == Principal(role="user", user="alice")


async def test_a_timeout_is_unavailable(hub: FakeHub, clock: Clock) -> None:
    hub.delay = 1.0
    auth = authenticator(hub, clock, timeout=0.05)
    with pytest.raises(IdentitySourceUnavailable, match="did not answer"):
        await auth.authenticate(hub.user("alice", [ACCESS]))


async def test_the_hub_is_not_sent_nbcluster_tokens_by_the_gateway_chain(
    tmp_path: Path, hub: FakeHub
) -> None:
    config = GatewayConfig(token="admin-token", state_dir=tmp_path, hub_api_url=API + "/")
    identity = GatewayIdentity(config, owner_of=lambda kernel_id: None)
    assert identity.hub is not None and identity.hub.api_url == API
    identity.hub._client = httpx.AsyncClient(transport=httpx.MockTransport(hub.handler))
    token = hub.user("alice", [ACCESS])
    assert await identity.authenticate(token) == Principal(role="user", user="alice")
    assert await identity.authenticate("admin-token") == Principal(role="admin", user="admin")
    user_token = identity.users.add("bob")
    assert await identity.authenticate(user_token) == Principal(role="user", user="bob")
    assert await identity.authenticate(identity.join_token) == Principal(role="host")
    assert len(hub.requests) == 1
    await identity.aclose()


def test_without_a_hub_url_there_is_no_hub_source(tmp_path: Path) -> None:
    identity = GatewayIdentity(GatewayConfig(token="t", state_dir=tmp_path), lambda k: None)
    assert identity.hub is None


# -- what the gateway answers -----------------------------------------------------------------


class _RaisingIdentity:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def authenticate(self, token: str) -> Principal | None:
        raise self.exc


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (IdentitySourceUnavailable("cannot check the token: JupyterHub at X did not answer"), 503,
         "identity source unavailable"),
        (TokenRefused("JupyterHub user 'carol''s token lacks the scope S"), 403, "forbidden"),
    ],
)  # fmt: skip
async def test_the_middleware_answers_503_or_403_with_the_reason(
    exc: Exception, status: int, reason: str
) -> None:
    app = AuthMiddleware(_ok_app, _RaisingIdentity(exc))  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        response = await client.get("/api/kernels", headers={"Authorization": "token abc"})
    assert response.status_code == status
    body = json.loads(response.text)
    assert body["reason"] == reason
    assert str(exc) in body["message"]


# -- settings ---------------------------------------------------------------------------------


def test_settings_from_the_environment_only_for_a_hub_managed_service() -> None:
    managed = {"JUPYTERHUB_API_URL": API, "JUPYTERHUB_SERVICE_NAME": "gw"}
    assert hub_settings_from_env(managed) == (API, "gw")
    # A single-user server has the API URL but no service name: not a service.
    assert hub_settings_from_env({"JUPYTERHUB_API_URL": API}) == (None, None)
    assert hub_settings_from_env({}) == (None, None)


@pytest.mark.parametrize("url", ["hub:8081/hub/api", "ftp://hub/hub/api", "http://", ""])
def test_api_urls_must_be_http(url: str) -> None:
    with pytest.raises(ValueError, match="is not JupyterHub's API URL"):
        check_api_url(url)
