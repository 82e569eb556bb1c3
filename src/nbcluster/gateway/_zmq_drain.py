"""Reading a ZMQ socket to empty without blocking: what an event-loop reader callback does.

The gateway reads its ZMQ sockets from ``loop.add_reader`` callbacks. The socket's fd is
edge-triggered, so each callback must take every message waiting, not just one. Both such
readers use :func:`drained`: ``ReplicaLink`` for its sockets to a replica (``_replica``) and
``ZmqFace`` for the sockets it binds for ZMQ clients (``_zmq_face``). Each handles the frames
itself and catches its own errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

__all__ = ["drained"]


def drained(
    sock: zmq.Socket[bytes], log: logging.Logger, what: str, *args: object
) -> Iterator[list[bytes]]:
    """Each message waiting on ``sock`` (its frames), until none is left.

    A socket error (the socket was closed meanwhile ...) ends it, logged at debug level on the
    caller's ``log`` as ``<what> socket: <error>`` (``what``: a %-format, ``args`` its
    arguments; formatted only when the message is logged).
    """
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except zmq.ZMQError as exc:
            log.debug(what + " socket: %s", *args, exc)
            return
        yield frames
