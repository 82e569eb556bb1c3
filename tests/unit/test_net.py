"""The replica's Raft port reservation (kernel/_app.py): held while pysyncobj has not bound it,
the port cannot be taken by a plain bind, and pysyncobj's server (SO_REUSEADDR) still can
listen on it, again after closing."""

from __future__ import annotations

import socket

import pytest

from nbcluster._net import reserve_port


def _listen(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def test_a_reserved_port_is_kept_from_others_and_open_to_its_server() -> None:
    with reserve_port("127.0.0.1") as reservation:
        port = reservation.getsockname()[1]
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with _listen(port) as server, socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = server.accept()
            conn.close()
        with _listen(port):  # a server that rebinds (a replica joining again) still can
            pass
