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

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["DeferredInterrupt"]

Handler = Callable[[int, FrameType | None], Any] | int | None


class DeferredInterrupt:
    """SIGINT recorded while a handler waits on its replica group, raised while code runs."""

    def __init__(self) -> None:
        self.pending = False

    def defer(self) -> Handler:
        """Record SIGINT from now on (a new handler: no interrupt pending); returns the handler
        it replaced, for the caller to restore. Called by the kernel's ``pre_handler_hook``.
        Off the main thread (an ipykernel subshell) signals cannot be handled: no change."""
        self.pending = False
        if threading.current_thread() is not threading.main_thread():
            return signal.getsignal(signal.SIGINT)
        return signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def take(self) -> bool:
        """Whether an interrupt came since :meth:`defer` (or the last ``take``); clears it."""
        pending, self.pending = self.pending, False
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
