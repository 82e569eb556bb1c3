"""When SIGINT may interrupt a replica: only while the cell's own code runs.

ipykernel makes SIGINT raise ``KeyboardInterrupt`` for the whole of a shell handler. In a
replica, ``execute_request``'s handler first proposes the cell on the Raft log and waits for the
election and for earlier cells' state; the gateway interrupts every live replica while no
executor is known yet. A ``KeyboardInterrupt`` raised inside those awaits lands in the event
loop or in pysyncobj's callbacks, not in a cell, and ended the replica (issue 16). So the
replica kernel (``_kernel``) installs :meth:`DeferredInterrupt.defer` as its handler hook: SIGINT
is only recorded during the handler; ``interruptible`` restores Python's default handler
around the cell's run; and a cell whose interrupt came during its election is answered
``KeyboardInterrupt`` without running, as a local kernel answers a cell interrupted at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["DeferredInterrupt"]

Handler = Callable[[int, FrameType | None], Any] | int | None


class DeferredInterrupt:
    """SIGINT recorded while a handler waits on its replica group, raised while code runs.

    Between handlers SIGINT is recorded too (ipykernel ignores it there), with its time: the
    gateway signals once it has seen the cell's ``busy``, which ipykernel publishes *before*
    ``pre_handler_hook``; an interrupt landing in between was ignored and the cell ran on.
    One that came before the request was received is for no cell and is dropped."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._signalled_at: float | None = None
        self._request: str | None = None
        self._request_at = -math.inf

    def request_received(self, msg_id: str) -> None:
        """Called by the kernel's ``set_parent`` on the main thread for each shell request
        (comm messages aside), just before ipykernel publishes its ``busy``: an interrupt
        recorded before now was not meant for it. Setting the same request again (ipykernel
        does after a concurrent comm message) keeps its time. Off the main thread (a
        subshell's request) nothing changes: SIGINT is the main thread's."""
        if threading.current_thread() is not threading.main_thread():
            return
        if msg_id != self._request:
            self._request, self._request_at = msg_id, self._clock()

    def defer(self) -> Handler:
        """Record SIGINT from now on; returns the handler for ipykernel's ``post_handler_hook``
        to restore, the same recorder. Called by the kernel's ``pre_handler_hook``.
        Off the main thread (an ipykernel subshell) signals cannot be handled: no change."""
        if threading.current_thread() is not threading.main_thread():
            return signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._record)
        return self._record

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._signalled_at = self._clock()

    @property
    def pending(self) -> bool:
        """Whether an interrupt came since the current request was received."""
        return self._signalled_at is not None and self._signalled_at >= self._request_at

    def take(self) -> bool:
        """Whether an interrupt came for the current request (see :attr:`pending`); clears it."""
        pending, self._signalled_at = self.pending, None
        return pending

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """SIGINT raises ``KeyboardInterrupt`` inside the block (the cell's run), and is
        recorded again after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
