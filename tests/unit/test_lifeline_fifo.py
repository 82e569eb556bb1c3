"""A replica in a container dies with its host daemon through a FIFO (``die_with_lifeline``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys, time
from nbcluster._lifeline import die_with_lifeline
die_with_lifeline(sys.argv[1])
print("armed", flush=True)
time.sleep(60)
"""


def _wait_exit(child: subprocess.Popen[str], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            return code
        time.sleep(0.02)
    return None


def test_the_process_lives_while_the_fifo_is_held_and_dies_when_it_is_closed(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "lifeline"
    os.mkfifo(fifo, 0o600)
    held = os.open(fifo, os.O_RDWR)  # as the host daemon holds it
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fifo)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "armed"
        assert _wait_exit(child, 0.5) is None  # still alive while the daemon holds it
        os.close(held)
        held = -1
        assert _wait_exit(child, 10) == -9  # SIGKILL once the last writer is gone
    finally:
        if held >= 0:
            os.close(held)
        child.kill()
        child.wait()


def test_a_missing_fifo_means_the_daemon_is_gone(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "absent")], stdout=subprocess.PIPE, text=True
    )
    assert _wait_exit(child, 10) == -9
