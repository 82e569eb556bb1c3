"""The replica's application: binds its sockets, then tells the host daemon which ports it got.

Ports are bound by the kernel itself (port 0, so no race between choosing and binding) and
reported as one JSON line on the file descriptor named by ``NBCLUSTER_REPORT_FD``, or, in a
container (which inherits no descriptor), on the FIFO named by ``NBCLUSTER_REPORT_PATH``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

from ipykernel.kernelapp import IPKernelApp

from .. import envvars
from .._lifeline import die_with_lifeline, die_with_parent
from .._net import reserve_port
from ._kernel import ReplicaKernel

__all__ = ["ReplicaKernelApp", "main"]


class ReplicaKernelApp(IPKernelApp):
    """IPKernelApp that reports its bound ports to the host daemon that started it."""

    name = "nbcluster-kernel"

    def initialize(self, argv: Any = None) -> None:
        log_to_the_replica_log()  # before ipykernel takes over fd 2
        super().initialize(argv)  # type: ignore[no-untyped-call]
        # traitlets leaves the application's logger at DEBUG and filters in its handlers, so
        # ipykernel's debug lines (several per message, one with the whole reply) each build
        # a log record that no handler writes: a few per cent of a trivial cell's CPU.
        self.log.setLevel(self.log_level)
        self._report_ports()

    def _report_ports(self) -> None:
        fd_text = envvars.REPORT_FD.get()
        report_path = envvars.REPORT_PATH.get()
        if not fd_text and not report_path:
            return
        # pysyncobj binds the Raft port itself later, when the replica joins its group; until
        # then (and for the process's life) the reservation keeps other processes off it.
        self._raft_port_reservation = reserve_port(self.ip)
        report = {
            "pid": os.getpid(),
            "ip": self.ip,
            "transport": self.transport,
            "shell_port": self.shell_port,
            "iopub_port": self.iopub_port,
            "stdin_port": self.stdin_port,
            "control_port": self.control_port,
            "hb_port": self.hb_port,
            "raft_port": self._raft_port_reservation.getsockname()[1],
            # Whether ipykernel made its sockets CURVE servers with the connection file's keys
            # (the host refuses a replica that was given keys and serves plain sockets).
            "curve": getattr(self, "curve_secretkey", None) is not None,
        }
        if fd_text:
            with os.fdopen(int(fd_text), "w") as pipe:
                pipe.write(json.dumps(report) + "\n")
        elif report_path:
            # The host daemon holds the FIFO open for reading, so this does not block.
            with open(report_path, "w", encoding="utf-8") as fifo:
                fifo.write(json.dumps(report) + "\n")


def log_to_the_replica_log() -> None:
    """nbcluster's log lines (a refused forged object, a store write that failed) go to the
    replica's log, the stderr its host daemon gave it (``logs/<replica>.log``). ipykernel then
    sends whatever the process writes to fd 1 and 2 to the notebook, so the handler writes to
    a copy of fd 2 taken first; and the lines do not propagate to the root logger, whose
    last-resort handler would print them into a cell."""
    logger = logging.getLogger("nbcluster")
    if any(getattr(h, "nbcluster_replica_log", False) for h in logger.handlers):
        return
    stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    handler = logging.StreamHandler(stream)
    handler.nbcluster_replica_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main() -> None:
    """Entry point of ``python -m nbcluster.kernel``, run by the host daemon."""
    parent = int(envvars.PARENT_PID.get() or 0)
    # A replica must not outlive its host daemon: a dead daemon means a lost host.
    die_with_parent(parent, signal.SIGKILL)
    lifeline = envvars.LIFELINE_PATH.get()
    if lifeline:
        die_with_lifeline(lifeline)
    ReplicaKernelApp.launch_instance(kernel_class=ReplicaKernel)
