"""The replica's SIGINT handling (kernel/_interrupts.py): recorded while a handler waits on its
replica group, raised as KeyboardInterrupt only inside ``interruptible``."""

from __future__ import annotations

import os
import signal

import pytest

from nbcluster.kernel._interrupts import DeferredInterrupt


def test_sigint_is_recorded_outside_the_run_and_raised_inside() -> None:
    interrupts = DeferredInterrupt()
    saved = interrupts.defer()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # during the election: recorded, nothing raised
        assert interrupts.take() is True
        assert interrupts.take() is False  # taken once
        with pytest.raises(KeyboardInterrupt), interrupts.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # after the run: recorded again
        assert interrupts.pending
    finally:
        signal.signal(signal.SIGINT, saved)


def test_a_new_handler_starts_with_no_interrupt_pending() -> None:
    interrupts = DeferredInterrupt()
    saved = interrupts.defer()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        interrupts.defer()
        assert interrupts.take() is False
    finally:
        signal.signal(signal.SIGINT, saved)
