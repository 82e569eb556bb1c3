"""Tie a process's life to its parent's, so that stopping ``nbcluster up`` or a host daemon
leaves no process behind even when the parent is killed with SIGKILL.

Called at start-up by the gateway, the host daemon and every kernel replica.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_lifeline", "die_with_parent", "set_parent_death_signal"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Arrange for ``sig`` to reach this process when ``parent_pid`` exits.

    On Linux the kernel delivers it (``PR_SET_PDEATHSIG``) at once; elsewhere a daemon thread
    polls the parent pid once a second. If the parent is already gone, the signal is raised now.
    """
    if parent_pid <= 0:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            _start_poller(parent_pid, sig)
    else:
        _start_poller(parent_pid, sig)
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """For ``preexec_fn``: the child being started gets ``sig`` when the process (thread) that
    started it dies. Used by host daemons for job processes, which run arbitrary commands that
    cannot arm it themselves; it survives ``execve``. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _start_poller(parent_pid: int, sig: int) -> None:
    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), sig)

    threading.Thread(target=poll, name="nbcluster-lifeline", daemon=True).start()


def die_with_lifeline(path: str, sig: int = signal.SIGKILL) -> None:
    """Arrange for ``sig`` to reach this process when the FIFO at ``path`` reaches end of file.

    For replicas in containers, which cannot see their host daemon's pid: the daemon opens the
    FIFO (read-write, so it never blocks) and keeps it open for the replica's life; when the
    daemon dies, the kernel closes it, the last writer is gone and a read here returns end of
    file. A FIFO that cannot be opened means the daemon is not there: the signal is raised now.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        os.kill(os.getpid(), sig)
        return

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 64):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="nbcluster-lifeline", daemon=True).start()
