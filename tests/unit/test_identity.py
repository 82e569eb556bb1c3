"""Identities: tokens, the users file, the route table, kernelspec access and quotas."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.gateway import create_app
from nbcluster.gateway._config import GatewayConfig
from nbcluster.identity import (
    ROUTE_RULES,
    AdminToken,
    Chain,
    JoinToken,
    KernelTokenAuthenticator,
    KernelTokens,
    Principal,
    QuotaExceeded,
    Quotas,
    UsersFile,
    UsersFileAuthenticator,
    UsersFileError,
    check_gpus,
    check_kernels,
    route_allowed,
    rule_for,
    spec_allowed,
)

# -- tokens -----------------------------------------------------------------------------------


def test_a_kernel_token_names_its_kernel_and_cannot_be_forged() -> None:
    tokens = KernelTokens(b"s" * 32)
    token = tokens.issue("k-1")
    assert token.startswith("nbk_") and tokens.kernel_of(token) == "k-1"
    # Another kernel's id with this MAC, another secret, a truncated MAC: all refused.
    assert tokens.kernel_of(token.replace("k-1", "k-2")) is None
    assert KernelTokens(b"t" * 32).kernel_of(token) is None
    assert tokens.kernel_of(token[:-1]) is None
    assert tokens.kernel_of("nbk_.abc") is None
    assert tokens.kernel_of("test-token") is None


@given(st.text(max_size=80))
def test_no_arbitrary_text_is_a_kernel_token(text: str) -> None:
    assert KernelTokens(b"s" * 32).kernel_of(text) is None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KernelTokens(b"short")


# -- the users file ---------------------------------------------------------------------------


def test_users_are_added_found_by_token_and_removed(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json")
    token = users.add("alice", quotas=Quotas(kernels=2))
    admin_token = users.add("root-op", admin=True)
    assert token.startswith("nbu_") and token != admin_token
    found = users.find(token)
    assert found is not None and found.name == "alice" and found.quotas.kernels == 2
    # Only digests are stored, and the file is the owner's only.
    text = (tmp_path / "users.json").read_text()
    assert token not in text and admin_token not in text
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    with pytest.raises(UsersFileError, match="exists already"):
        users.add("alice")
    new = users.replace_token("alice")
    assert users.find(token) is None
    assert users.find(new) is not None
    users.remove("alice")
    assert users.find(new) is None and users.get("alice") is None
    with pytest.raises(UsersFileError, match="no user named 'alice'"):
        users.remove("alice")


def test_a_second_reader_sees_changes(tmp_path: Path) -> None:
    """The gateway's reader picks up what ``nbcluster user add`` wrote."""
    reader = UsersFile(tmp_path / "users.json")
    assert reader.users() == []
    token = UsersFile(tmp_path / "users.json").add("bob")
    found = reader.find(token)
    assert found is not None and found.name == "bob"


def test_a_world_readable_users_file_is_refused(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json")
    users.add("bob")
    os.chmod(tmp_path / "users.json", 0o644)
    with pytest.raises(UsersFileError, match="readable by others"):
        UsersFile(tmp_path / "users.json").users()


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 129, "é"])
def test_bad_user_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid user name"):
        UsersFile(tmp_path / "users.json").add(name)


# -- authenticators ---------------------------------------------------------------------------


async def test_the_chain_tells_each_kind_of_token_apart(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json")
    alice = users.add("alice")
    kernel_tokens = KernelTokens(b"s" * 32)
    owners = {"k-1": "alice"}
    chain = Chain(
        [
            AdminToken("admin-token", "ops"),
            UsersFileAuthenticator(users),
            KernelTokenAuthenticator(kernel_tokens, owners.get),
            JoinToken("join-token"),
        ]
    )
    assert await chain.authenticate("admin-token") == Principal(role="admin", user="ops")
    assert await chain.authenticate(alice) == Principal(role="user", user="alice")
    assert await chain.authenticate(kernel_tokens.issue("k-1")) == Principal(
        role="kernel", user="alice", kernel_id="k-1"
    )
    assert await chain.authenticate("join-token") == Principal(role="host")
    # A kernel token dies with its kernel.
    del owners["k-1"]
    assert await chain.authenticate(kernel_tokens.issue("k-1")) is None
    assert await chain.authenticate("nope") is None


# -- the route table --------------------------------------------------------------------------


def test_every_route_of_the_app_has_a_rule(tmp_path: Path) -> None:
    """An endpoint without a rule is open to admins only: every one the app serves must have
    been decided on (and no rule may name a route the app does not have)."""
    app = create_app(GatewayConfig(token="t", state_dir=tmp_path))
    paths = set()
    for route in _routes(app.routes):
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None) or {"WS"}
        if path is None:
            continue
        paths.add(path)
        for method in methods:
            if method in ("HEAD", "OPTIONS"):
                continue
            assert rule_for(method, _example(path)) is not None, f"{method} {path} has no rule"
    assert {r.template for r in ROUTE_RULES} <= paths


def _routes(routes: list[Any]) -> list[Any]:
    """Every route, included routers' too (FastAPI ≥ 0.16x keeps those as their router)."""
    found: list[Any] = []
    for route in routes:
        router = getattr(route, "original_router", None)
        found.extend(_routes(router.routes) if router is not None else [route])
    return found


def _example(template: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "x1", template)


@pytest.mark.parametrize(
    ("role", "method", "path", "allowed"),
    [
        ("user", "GET", "/api/kernels", True),
        ("user", "WS", "/api/kernels/abc/channels", True),
        ("kernel", "WS", "/api/kernels/abc/channels", False),
        ("kernel", "GET", "/api/kernels", False),
        ("kernel", "POST", "/api/jobs", True),
        ("kernel", "GET", "/api/jobs/j1/outputs/a/b.csv", True),
        ("kernel", "GET", "/metrics", False),
        ("user", "GET", "/metrics", False),
        ("user", "GET", "/api/cluster/hosts", False),
        ("user", "POST", "/api/cluster/kernels/k/replicas/r/migrate", False),
        ("user", "POST", "/api/cluster/kernels/k/checkpoint", True),
        ("host", "WS", "/api/cluster/hosts/connect", True),
        ("host", "GET", "/api/kernels", False),
        ("user", "WS", "/api/cluster/hosts/connect", False),
        ("admin", "WS", "/api/cluster/hosts/connect", False),
        ("admin", "GET", "/api/cluster/hosts", True),
        ("user", "GET", "/no/such/route", False),
        ("admin", "GET", "/no/such/route", True),
    ],
)
def test_roles_on_routes(role: str, method: str, path: str, allowed: bool) -> None:
    principal = Principal(role=role, user="u")  # type: ignore[arg-type]
    assert route_allowed(principal, method, path) is allowed


def test_ownership() -> None:
    assert Principal(role="user", user="a").owns("a")
    assert not Principal(role="user", user="a").owns("b")
    assert not Principal(role="user", user="").owns("")
    assert Principal(role="admin", user="ops").owns("b")
    assert not Principal(role="host").owns("")


# -- kernelspec access and quotas ---------------------------------------------------------


def test_kernelspec_access_follows_gateway_provisioners() -> None:
    stanza = {"kernel_provisioner": {"config": {"authorized_users": "bob,alice"}}}
    assert spec_allowed("alice", "gpu", stanza) is None
    assert "not in its authorized_users" in (spec_allowed("carol", "gpu", stanza) or "")
    # Denial wins, from the spec or the gateway's own list.
    denied = {"nbcluster": {"authorized_users": ["alice"], "unauthorized_users": ["alice"]}}
    assert "unauthorized_users" in (spec_allowed("alice", "gpu", denied) or "")
    assert spec_allowed("root", "python3", {}, unauthorized=("root",)) is not None
    assert spec_allowed("anyone", "python3", {}) is None


def test_quotas_name_the_limit() -> None:
    quotas = Quotas(kernels=2, gpus=4)
    check_kernels("a", quotas, 1)
    with pytest.raises(QuotaExceeded, match=r"quotas.kernels") as info:
        check_kernels("a", quotas, 2)
    assert info.value.status == 429
    check_gpus("a", quotas, 2, 2, "the job")
    with pytest.raises(QuotaExceeded, match=r"holds 3 of their quota of 4") as info:
        check_gpus("a", quotas, 3, 2, "the job")
    assert info.value.status == 429
    with pytest.raises(QuotaExceeded, match=r"over user 'a'.s quota of 4") as info:
        check_gpus("a", quotas, 0, 5, "the job")
    assert info.value.status == 403
    check_gpus("a", Quotas(), 100, 100, "the job")


async def test_an_unreadable_users_file_authenticates_nobody_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = UsersFile(tmp_path / "users.json")
    token = users.add("alice")
    chain = Chain([AdminToken("admin-token"), UsersFileAuthenticator(users)])
    (tmp_path / "users.json").write_text("{not json")
    assert await chain.authenticate(token) is None
    assert await chain.authenticate(token) is None
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "users file" in r.message)
    ) == 1, "said once, not per request"
    assert await chain.authenticate("admin-token") == Principal(role="admin", user="admin")
