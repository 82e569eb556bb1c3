"""What a gateway kernel (``_kernel.GatewayKernel``) talks to besides its replicas, as
protocols: its clients (:class:`ClientSink`) and the gate that decides where and when its cells
run (:class:`ExecutionGate`).

The websocket handlers (``_channels``) and the ZMQ faces (``_zmq_face``) attach clients that
are ``ClientSink``\\ s; the kernel manager gives every kernel the scheduler driver
(``_driver``) as its ``ExecutionGate``. Nothing here runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from ..protocol import Message

if TYPE_CHECKING:
    from ._kernel import GatewayKernel

__all__ = ["ClientSink", "ExecutionGate"]


class ClientSink(Protocol):
    """A websocket client as the kernel sees it (see ``_channels.ClientConnection``)."""

    def send(self, msg: Message) -> None: ...

    def close(self, code: int = 1000, reason: str = "") -> None: ...


class ExecutionGate(Protocol):
    """Decides where and when each cell runs (the scheduler's driver, ``_driver``).

    The kernel calls :meth:`execution_requested` for every ``execute_request``; the gate
    answers, now or later, with :meth:`GatewayKernel.dispatch` (run it on that replica with
    those GPUs), :meth:`GatewayKernel.show_waiting` or :meth:`GatewayKernel.cancel_waiting`.
    """

    def execution_requested(
        self, kernel: GatewayKernel, term: int, preferred: str | None, gpus: int | None = None
    ) -> None:
        """A cell arrived, or must run again elsewhere (its replica was lost). ``gpus``: what
        the cell asks for itself (``%%cpu``: 0), None for the kernel's request."""

    def execution_finished(self, kernel: GatewayKernel, term: int) -> None:
        """The cell's reply arrived, or it was answered without running."""

    def execution_cancelled(self, kernel: GatewayKernel, term: int) -> None:
        """The user interrupted a cell that was waiting for GPUs."""

    def device_memory_reported(
        self, kernel: GatewayKernel, replica_id: str, held: Mapping[int, int]
    ) -> None:
        """After a cell, ``replica_id`` keeps ``held`` bytes per GPU (its namespace's)."""
