"""Identities and what they may do: users (a users file, or JupyterHub), the operator's admin
token, kernel-scoped tokens and the join token of host daemons.

The gateway authenticates every request through a :class:`Chain` of :class:`Authenticator`
sources, checks the role against :data:`ROUTE_RULES`, and its handlers check ownership with
:meth:`Principal.owns`. ``nbcluster user`` edits the :class:`UsersFile`. Nothing here does
network I/O except the JupyterHub source."""

from ._access import ROUTE_RULES, RouteRule, route_allowed, route_is_public, rule_for
from ._authenticators import (
    AdminToken,
    Authenticator,
    Chain,
    JoinToken,
    KernelTokenAuthenticator,
    UsersFileAuthenticator,
)
from ._errors import IdentitySourceUnavailable, TokenRefused
from ._hub import (
    HUB_API_URL_ENV,
    HUB_SERVICE_NAME_ENV,
    HubAuthenticator,
    check_api_url,
    hub_settings_from_env,
)
from ._kernelspec_access import spec_allowed
from ._principal import Principal, Role
from ._quotas import QuotaExceeded, check_gpus, check_kernels
from ._tokens import (
    JOIN_TOKEN_PREFIX,
    KERNEL_TOKEN_PREFIX,
    USER_TOKEN_PREFIX,
    KernelTokens,
    new_token,
    token_digest,
)
from ._users import Quotas, UserRecord, UsersFile, UsersFileError, validate_user_name

__all__ = [
    "HUB_API_URL_ENV",
    "HUB_SERVICE_NAME_ENV",
    "JOIN_TOKEN_PREFIX",
    "KERNEL_TOKEN_PREFIX",
    "ROUTE_RULES",
    "USER_TOKEN_PREFIX",
    "AdminToken",
    "Authenticator",
    "Chain",
    "HubAuthenticator",
    "IdentitySourceUnavailable",
    "JoinToken",
    "KernelTokenAuthenticator",
    "KernelTokens",
    "Principal",
    "QuotaExceeded",
    "Quotas",
    "Role",
    "RouteRule",
    "TokenRefused",
    "UserRecord",
    "UsersFile",
    "UsersFileAuthenticator",
    "UsersFileError",
    "check_api_url",
    "check_gpus",
    "check_kernels",
    "hub_settings_from_env",
    "new_token",
    "route_allowed",
    "route_is_public",
    "rule_for",
    "spec_allowed",
    "token_digest",
    "validate_user_name",
]
