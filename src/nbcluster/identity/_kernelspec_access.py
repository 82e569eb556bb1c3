"""Who may start a kernel of a kernelspec: the Gateway Provisioners convention.

A kernelspec names ``authorized_users`` and ``unauthorized_users`` in
``metadata.kernel_provisioner.config`` (as Gateway Provisioners reads them) or in
``metadata.nbcluster``; each is a list of names or one comma-separated string. The gateway
adds its own ``unauthorized_users`` (default ``root``). Denial wins: a user named in any
``unauthorized_users`` may not, even when also authorised. An empty ``authorized_users``
authorises everyone. Admins are users like the others here: the operator edits the spec."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["spec_allowed"]


def _names(value: Any) -> set[str]:
    if isinstance(value, str):
        return {n.strip() for n in value.split(",") if n.strip()}
    if isinstance(value, Iterable):
        return {str(n).strip() for n in value if str(n).strip()}
    return set()


def _stanzas(metadata: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = []
    provisioner = metadata.get("kernel_provisioner")
    if isinstance(provisioner, Mapping) and isinstance(provisioner.get("config"), Mapping):
        found.append(provisioner["config"])
    own = metadata.get("nbcluster")
    if isinstance(own, Mapping):
        found.append(own)
    return found


def spec_allowed(
    user: str, spec_name: str, metadata: Mapping[str, Any], unauthorized: Iterable[str] = ()
) -> str | None:
    """None if ``user`` may start kernels of the spec, else why not (for a 403)."""
    stanzas = _stanzas(metadata)
    denied = set(unauthorized)
    authorized: set[str] = set()
    for stanza in stanzas:
        denied |= _names(stanza.get("unauthorized_users"))
        authorized |= _names(stanza.get("authorized_users"))
    if user in denied:
        return (
            f"user {user!r} is not authorized to start {spec_name!r} kernels (unauthorized_users)"
        )
    if authorized and user not in authorized:
        return (
            f"user {user!r} is not authorized to start {spec_name!r} kernels (not in its "
            "authorized_users)"
        )
    return None
