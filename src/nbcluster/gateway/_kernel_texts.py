"""What a kernel's clients read when it cannot answer them as a local kernel would, pure: why
a request is refused, and the errors of requests and cells whose replica was lost.

The gateway kernel (``_kernel.GatewayKernel``) calls these when it refuses a client's message,
when a replica or every replica is lost (``on_replica_lost``, ``begin_restore``), and when a
cell's term was won by a replica that was lost meanwhile (:func:`lost_cell_replies`).
"""

from __future__ import annotations

from typing import Any

from ..protocol import Message, read_yielded
from ._replies import error_replies

__all__ = [
    "every_replica_lost",
    "lost_cell_replies",
    "replica_lost",
    "unavailable_reason",
]


def unavailable_reason(state: str, dead_reason: str) -> str:
    """Why a kernel in ``state`` (with this cause of death, if any) cannot take a request."""
    if state == "restarting":
        return "the kernel is restarting; send the request again when it is idle"
    if dead_reason:
        return f"the kernel is dead: {dead_reason}. Restart it to continue."
    return "the kernel has no running replica. Restart it to continue."


def replica_lost(reason: str) -> str:
    """The error of the requests a lost replica owed (the kernel has others)."""
    return (
        f"{reason}. The cell it was running is lost; the kernel continues on its other "
        "replicas with the state of the cells before it."
    )


def every_replica_lost(reason: str) -> str:
    """The error of the open requests of a kernel that lost every replica (being restored)."""
    return (
        f"{reason}. Every replica of the kernel is gone; it is being restored from its "
        "last checkpoint."
    )


def lost_cell_replies(request_header: bytes, reason: str, yielded: dict[str, Any]) -> list[Message]:
    """What the client gets for a cell whose term a lost replica had won: a ``ReplicaLost``
    error that says whether the cell had run to the end there (``yielded``: the content of the
    reply that said so), with the cell's execution count when it had one."""
    count = yielded.get("execution_count")
    fields = read_yielded(yielded)
    if fields is not None and fields.completed:
        # It ran to the end and its state reached the others; only its answer was lost.
        what = (
            "The cell had run to the end there and its variables were kept, but its "
            "outputs were lost; the kernel continues on its other replicas."
        )
    else:
        what = (
            "The cell had started there and its effects are lost; the kernel continues "
            "on its other replicas with the state of the cells before it."
        )
    return error_replies(
        "shell",
        "execute_request",
        request_header,
        "ReplicaLost",
        f"{reason}. {what}",
        # The count the cell had, as an interrupted cell's reply on a local kernel.
        execution_count=count if isinstance(count, int) and count > 0 else None,
    )
