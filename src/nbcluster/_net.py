"""Small socket helpers shared by the launcher (``nbcluster up``) and the kernel replica."""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_is_free"]


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def free_port(ip: str) -> int:
    """A port nothing listens on now. The caller binds it later, so another process could
    take it in between: used only where that window is small and a failure is reported."""
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def port_is_free(ip: str, port: int) -> bool:
    with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True
