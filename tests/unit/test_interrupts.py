"""The replica's SIGINT handling (kernel/_interrupts.py): recorded while a handler waits on its
replica group, raised as KeyboardInterrupt only inside ``interruptible``, and kept for a request
only when it came after that request was received."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from nbcluster.kernel._interrupts import DeferredInterrupt


@pytest.fixture
def restore_sigint() -> Iterator[None]:
    saved = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sigint_is_recorded_outside_the_run_and_raised_inside(restore_sigint: None) -> None:
    interrupts = DeferredInterrupt()
    interrupts.request_received("cell-1")
    interrupts.defer()
    os.kill(os.getpid(), signal.SIGINT)  # during the election: recorded, nothing raised
    assert interrupts.take() is True
    assert interrupts.take() is False  # taken once
    with pytest.raises(KeyboardInterrupt), interrupts.interruptible():
        os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # after the run: recorded again
    assert interrupts.pending


def test_handlers_restore_the_recorder_not_ipykernels_ignore(restore_sigint: None) -> None:
    """Between handlers SIGINT is recorded, not ignored: ipykernel publishes ``busy`` before
    its ``pre_handler_hook``, and the gateway's interrupt may land in between."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what ipykernel installs at start
    interrupts = DeferredInterrupt()
    restored = interrupts.defer()
    signal.signal(signal.SIGINT, restored)  # ipykernel's post_handler_hook
    interrupts.request_received("cell-2")  # set_parent, then busy is published
    os.kill(os.getpid(), signal.SIGINT)  # the gateway's interrupt, before pre_handler_hook
    interrupts.defer()  # pre_handler_hook
    assert interrupts.take() is True


def test_an_interrupt_from_before_the_request_is_for_no_cell(restore_sigint: None) -> None:
    clock = Clock()
    interrupts = DeferredInterrupt(clock)
    interrupts.defer()
    clock.now = 1.0
    os.kill(os.getpid(), signal.SIGINT)  # the kernel was idle: nothing to interrupt
    clock.now = 2.0
    interrupts.request_received("cell-3")
    interrupts.defer()
    assert interrupts.take() is False
    clock.now = 3.0
    os.kill(os.getpid(), signal.SIGINT)
    # ipykernel sets the running cell's parent again after a concurrent comm message: the
    # request's time stays, so the interrupt stays pending.
    clock.now = 4.0
    interrupts.request_received("cell-3")
    assert interrupts.take() is True
