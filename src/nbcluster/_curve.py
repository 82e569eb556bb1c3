"""CurveZMQ keys for the gateway's links to kernel replicas (``docs/security.md``, "Encrypted
transport").

The convention is Jupyter's (jupyter_client >= 8.9, ipykernel >= 7.3): a kernel's connection
file carries a server keypair, ``curve_publickey`` and ``curve_secretkey`` (Z85 text), and the
kernel makes each of its sockets a CURVE server with it. A client sets the server's public key
as ``curve_serverkey`` and a keypair of its own. ipykernel runs no ZAP handler, so any client
that knows the server's public key is let in: that key is kept as secret as the kernel's HMAC
key (the gateway's records and the host's connection files, both owner-only); a socket that
does not know it cannot even finish the handshake, so it reads nothing.

The gateway makes a fresh server keypair for every replica and sends only the secret half to
the host daemon (the public half follows from it), which writes both into the connection file.
"""

from __future__ import annotations

import functools

import zmq

__all__ = [
    "CurveUnavailable",
    "apply_client_keys",
    "new_server_secret",
    "public_key_of",
    "require_curve",
]


class CurveUnavailable(RuntimeError):
    """This pyzmq's libzmq was built without CURVE (libsodium)."""


def require_curve() -> None:
    """Raise :class:`CurveUnavailable` unless libzmq can do CURVE."""
    if not zmq.has("curve"):
        raise CurveUnavailable(
            "CurveZMQ is not available: this pyzmq's libzmq was built without CURVE "
            "(install a pyzmq wheel from PyPI, which bundles it)"
        )


def new_server_secret() -> str:
    """A fresh server secret key (Z85, 40 characters)."""
    require_curve()
    _public, secret = zmq.curve_keypair()
    return secret.decode("ascii")


def public_key_of(secret: str) -> str:
    """The public key of a Z85 secret key."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


@functools.cache
def _client_keypair() -> tuple[bytes, bytes]:
    # One keypair per process is enough: without a ZAP handler the server does not check the
    # client's key, and CURVE's per-connection session keys give each link forward secrecy.
    return zmq.curve_keypair()


def apply_client_keys(sock: zmq.Socket[bytes], server_public: str) -> None:
    """Make ``sock`` a CURVE client of a server with this public key (before it connects)."""
    public, secret = _client_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public.encode("ascii")
