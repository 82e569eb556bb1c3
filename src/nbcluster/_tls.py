"""TLS to the gateway, for both ends (``docs/security.md``, "Encrypted transport").

The gateway serves https and wss with ``--certfile``/``--keyfile``; everything that calls it
(host daemons, the CLI, :mod:`nbcluster.client`, a kernel's ``%%job`` magic) verifies its
certificate against a CA file when given one (``--ca``, ``NBCLUSTER_CA``; a kernel gets its
host's as ``NBCLUSTER_GATEWAY_CA``), else against the system's trust store. Verification is
never turned off: a certificate that does not verify is a refused connection, with a message
that says which CA to pass.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

__all__ = [
    "TlsConfigError",
    "check_server_files",
    "client_context",
    "is_loopback",
    "unverified_reason",
]


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, IPv6 possibly in brackets) is this machine
    only. Wildcards (``0.0.0.0``, ``::``) and other names are not."""
    bare = host.strip("[]")
    if bare == "localhost" or bare.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def check_server_files(certfile: Path, keyfile: Path) -> None:
    """Load the gateway's certificate chain and key once, so that a wrong file is reported
    at start-up, naming it, rather than by uvicorn's traceback."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot use the certificate {certfile} with the key {keyfile}: {exc}"
        ) from None


def client_context(ca: str | Path | None = None) -> ssl.SSLContext:
    """A context that verifies the gateway's certificate and name: against the certificates
    in ``ca`` (a PEM file) when given, else against the system's trust store."""
    if not ca:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot read the CA file {ca}: {exc}") from None


def unverified_reason(exc: BaseException) -> str | None:
    """If ``exc`` (or what caused it) is a failed certificate verification, what failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or current)
        current = current.__cause__ or current.__context__
    return None
