"""Which roles may call which endpoint: one table, checked by the gateway's auth middleware
before a request reaches its handler. Ownership (a user touches only their own kernels and
jobs) is checked by the handlers, which know what a request names.

An endpoint missing from the table is open to admins only, so a new endpoint is closed until
someone decides who may call it (a unit test lists every route the app has against it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ._principal import Principal, Role

__all__ = ["ROUTE_RULES", "RouteRule", "route_allowed", "route_is_public", "rule_for"]

_PEOPLE: frozenset[Role] = frozenset({"admin", "user"})
_JOBS: frozenset[Role] = frozenset({"admin", "user", "kernel"})
_ADMIN: frozenset[Role] = frozenset({"admin"})
_ANY: frozenset[Role] = frozenset({"admin", "user", "kernel", "host"})


@dataclass(frozen=True)
class RouteRule:
    template: str
    roles: frozenset[Role]
    methods: frozenset[str] = frozenset({"GET", "POST", "DELETE", "PATCH", "PUT", "HEAD", "WS"})
    #: Served without a token: only static pages and assets that hold no data (the
    #: dashboard's and the API docs' shells, which then call the API with the user's token).
    public: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.template)


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join(
        (".+" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p)
        for p in parts
    )
    return re.compile(regex + "/?")


#: First match wins. ``WS``: a websocket handshake.
ROUTE_RULES: tuple[RouteRule, ...] = (
    RouteRule("/api", _ANY, frozenset({"GET"})),
    # Swagger UI and ReDoc are static pages (vendored, no data): public, so that a browser
    # opens them; they fetch the schema with the token the user gives them. The schema:
    # anyone the gateway knows (a kernel may read it too).
    RouteRule("/docs", frozenset(), frozenset({"GET"}), public=True),
    RouteRule("/redoc", frozenset(), frozenset({"GET"}), public=True),
    RouteRule("/openapi.json", _ANY, frozenset({"GET"})),
    # The dashboard's page and its vendored assets (no data: it logs in with a token and
    # reads the API below as that user).
    RouteRule("/dashboard", frozenset(), frozenset({"GET"}), public=True),
    RouteRule("/dashboard/static/{path:path}", frozenset(), frozenset({"GET"}), public=True),
    RouteRule("/api/kernelspecs", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/kernelspecs/{name}", _PEOPLE, frozenset({"GET"})),
    RouteRule("/kernelspecs/{name}/{filename}", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/kernels", _PEOPLE),
    RouteRule("/api/kernels/{kernel_id}", _PEOPLE),
    RouteRule("/api/kernels/{kernel_id}/channels", _PEOPLE, frozenset({"WS"})),
    RouteRule("/api/kernels/{kernel_id}/interrupt", _PEOPLE, frozenset({"POST"})),
    RouteRule("/api/kernels/{kernel_id}/restart", _PEOPLE, frozenset({"POST"})),
    RouteRule("/api/cluster/hosts/connect", frozenset({"host"}), frozenset({"WS"})),
    # Hosts, their load and every replica on them: the operator's view.
    RouteRule("/api/cluster/hosts", _ADMIN, frozenset({"GET"})),
    # Draining a host is placement, the operator's call.
    RouteRule("/api/cluster/hosts/{name}/drain", _ADMIN, frozenset({"POST", "DELETE"})),
    # Notices and the overview: each caller sees what concerns their own kernels and jobs.
    RouteRule("/api/cluster/events", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/cluster/events/stream", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/cluster/overview", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/cluster/kernels", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/cluster/kernels/{kernel_id}", _PEOPLE, frozenset({"GET"})),
    RouteRule("/api/cluster/kernels/{kernel_id}/checkpoint", _PEOPLE, frozenset({"POST"})),
    # A kernel's ZMQ face: its owner's (the handler checks ownership), never a kernel's.
    RouteRule("/api/cluster/kernels/{kernel_id}/connection", _PEOPLE, frozenset({"GET", "DELETE"})),
    # Moving replicas between hosts is placement, the operator's call.
    RouteRule(
        "/api/cluster/kernels/{kernel_id}/replicas/{replica_id}/migrate",
        _ADMIN,
        frozenset({"POST"}),
    ),
    RouteRule("/api/jobs", _JOBS, frozenset({"GET", "POST"})),
    RouteRule("/api/jobs/inputs", _JOBS, frozenset({"POST"})),
    RouteRule("/api/jobs/stats", _JOBS, frozenset({"GET"})),
    # Workers are hosts: the operator's view.
    RouteRule("/api/jobs/workers", _ADMIN, frozenset({"GET"})),
    RouteRule("/api/jobs/{job_id}", _JOBS, frozenset({"GET"})),
    RouteRule("/api/jobs/{job_id}/cancel", _JOBS, frozenset({"POST"})),
    RouteRule("/api/jobs/{job_id}/events", _JOBS, frozenset({"GET"})),
    RouteRule("/api/jobs/{job_id}/logs", _JOBS, frozenset({"GET"})),
    RouteRule("/api/jobs/{job_id}/outputs", _JOBS, frozenset({"GET"})),
    RouteRule("/api/jobs/{job_id}/outputs/{name:path}", _JOBS, frozenset({"GET"})),
    RouteRule("/metrics", _ADMIN, frozenset({"GET"})),
)

_COMPILED = tuple((rule, rule.pattern) for rule in ROUTE_RULES)


def rule_for(method: str, path: str, rules: Iterable[RouteRule] | None = None) -> RouteRule | None:
    """The rule for a request (``method`` ``WS`` for a websocket), None when none matches."""
    compiled = _COMPILED if rules is None else tuple((r, r.pattern) for r in rules)
    for rule, pattern in compiled:
        if method in rule.methods and pattern.fullmatch(path):
            return rule
    return None


def route_is_public(method: str, path: str) -> bool:
    """Whether the auth middleware lets a request through without a token."""
    rule = rule_for(method, path)
    return rule is not None and rule.public


def route_allowed(principal: Principal, method: str, path: str) -> bool:
    rule = rule_for(method, path)
    if rule is None:
        return principal.is_admin
    return principal.role in rule.roles
