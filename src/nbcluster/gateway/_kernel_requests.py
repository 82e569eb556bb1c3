"""The gateway's own requests to a kernel's replica, beside its clients': a ``kernel_info``
to see that a replica is ready, an interrupt or a shutdown on control, an eviction.

Such a request is kept in the kernel's open requests like a client's, owned by a
:class:`Waiter` instead of a client: the kernel (``_kernel.GatewayKernel``) answers the waiter
when the reply comes, or fails it when the replica is lost. ``GatewayKernel.request`` and
``GatewayKernel.wait_ready`` call :func:`send_and_wait` and :func:`wait_ready`; the kernel manager's
modules call those (``_replicas`` after a replica starts, ``_reconcile`` when a restarted
gateway re-attaches, ``_control`` and ``_manager`` on control).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol import Message
from ._kernel_protocols import ClientSink
from ._replica import ReplicaLink
from ._routing import PendingRequests

__all__ = ["Ask", "Owner", "Waiter", "send_and_wait", "wait_ready"]


class Waiter:
    """Owner of a request the gateway itself sent (readiness checks, shutdown)."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    def answer(self, reply: Message) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


#: Who a kernel's open request is for: a client, or the gateway itself.
Owner = ClientSink | Waiter

#: ``GatewayKernel.request``: send a request of the gateway's own, wait for its reply.
Ask = Callable[[ReplicaLink, str, str, dict[str, Any], float], Awaitable[Message]]


async def send_and_wait(
    pending: PendingRequests[Owner], link: ReplicaLink, msg: Message, timeout: float
) -> Message:
    """Send ``msg``, a request of the gateway's own, on ``link``, registered in the kernel's
    ``pending`` requests, and wait for its reply (``TimeoutError`` after ``timeout`` s)."""
    waiter = Waiter()
    pending.add(msg.msg_id, msg.msg_type, msg.channel, msg.header, waiter)
    try:
        link.send(msg)
        return await asyncio.wait_for(waiter.future, timeout)
    finally:
        pending.route(msg.msg_id, msg.msg_type.replace("_request", "_reply"))


async def wait_ready(ask: Ask, link: ReplicaLink, timeout: float) -> dict[str, Any]:
    """Wait until the replica answers kernel_info (asked through ``ask``) and its IOPub
    reaches us. Returns the kernel_info reply content; raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"replica {link.replica_id} did not become ready in {timeout:.0f} s")
        try:
            reply = await ask(link, "shell", "kernel_info_request", {}, min(1.0, remaining))
            info = reply.content_dict
        except TimeoutError:
            continue
        # Every kernel_info request also publishes busy/idle: once one of those (or the
        # XPUB welcome) has arrived, our subscription is live and no output can be missed.
        if info is not None and link.iopub_seen.is_set():
            return info
        try:
            await asyncio.wait_for(link.iopub_seen.wait(), min(0.2, max(remaining, 0.01)))
            return info
        except TimeoutError:
            continue
