"""Small socket helpers shared by the launcher (``nbcluster up``), the kernel replica and the
gateway's HTTP clients."""

from __future__ import annotations

import socket

__all__ = ["CLIENT_KEEPALIVE_EXPIRY", "free_port", "port_is_free", "reserve_port"]

#: Seconds an HTTP client of the gateway keeps an idle connection. The gateway closes idle
#: connections after 5 s (``--keep-alive-timeout``) and httpx keeps them 5 s by default: a
#: request sent on a connection just as the gateway closed it failed with "connection reset
#: by peer" (seen under load). A client that gives them up first never meets that race.
CLIENT_KEEPALIVE_EXPIRY = 2.0


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def free_port(ip: str) -> int:
    """A port nothing listens on now. The caller binds it later, so another process could
    take it in between: used only where that window is small and a failure is reported."""
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def reserve_port(ip: str) -> socket.socket:
    """A socket bound to a free port and never listened on, which the caller keeps open until
    the server that will listen there has bound it (and may keep for its life).

    Called by the replica for its Raft port, which pysyncobj binds only when the replica joins
    its group, seconds later. A port merely found free (:func:`free_port`) is in the ephemeral
    range, so in that window an outgoing connection of any process could take it (seen under
    load: "cannot bind the address"). A bound socket keeps it out of the ephemeral allocator;
    both sockets set ``SO_REUSEADDR`` (pysyncobj's server does), and Linux lets the listener
    bind beside a socket that is not listening."""
    reservation = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.bind((ip, 0))
    except OSError:
        reservation.close()
        raise
    return reservation


def port_is_free(ip: str, port: int) -> bool:
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True
