"""How the gateway starts, signals and stops kernel replicas: the seam for host providers.

A *launcher* turns a :class:`LaunchSpec` (which kernel, which replica, on which host, with what
argv, environment and working directory) into a running replica process whose five Jupyter
ports (and Raft port) it reports, and hands back a :class:`ReplicaProcess`, a handle shaped
like :class:`subprocess.Popen`: ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``.
Everything above it (``_replicas``, ``_membership``, ``_recovery``) speaks only this
interface; what runs the process is the launcher's business.

Today there is one launcher, :class:`._host_launcher.HostDaemonLauncher`: it asks the host
daemon connected to the gateway (``nbcluster host``) over the host protocol
(``nbcluster.hostproto``). A launcher for Docker, Swarm, Kubernetes or ssh implements the same
two protocols: ``launch`` starts a container/pod/remote process from the spec (the argv runs
with ``{connection_file}`` replaced; the replica binds port 0 and reports its ports, see
``nbcluster.kernel``) and returns its handle; ``attach`` gives a handle to a replica that
already runs (a restarted gateway finds it in its records). When a replica exits (whatever
the cause: it crashed, it was stopped, its container was removed), the launcher reports it
once to the :data:`ExitListener` it was built with, and the handle's ``poll``/``wait`` return
the exit code. Failures raise :class:`LaunchError` with a sentence that says why; it is shown
to users as the reason a replica did not start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..hostproto import ConnectionInfo
from ._errors import NbclusterError

__all__ = [
    "ExitListener",
    "LaunchError",
    "LaunchSpec",
    "ReplicaExit",
    "ReplicaLauncher",
    "ReplicaProcess",
]


class LaunchError(NbclusterError, RuntimeError):
    """A replica could not be started, signalled or stopped; the text says why."""

    status = 503
    reason = "replica could not be launched"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything a launcher needs to start one replica."""

    kernel_id: str
    replica_id: str
    #: Where it runs: a host as the scheduler placed it (a host daemon's name today; a
    #: node, a Swarm node or an ssh target for other launchers).
    host: str
    #: The kernelspec's argv (``{connection_file}`` is filled in by whoever writes the file).
    argv: tuple[str, ...]
    #: The replica's environment on top of the launcher's own (``nbcluster.envvars``).
    env: Mapping[str, str] = field(default_factory=dict)
    #: The kernel's HMAC key (the connection file's ``key``).
    key: str = ""
    #: The working directory, when it exists on the host (else the host's default).
    working_dir: str | None = None
    #: Seconds the replica has to report its ports.
    launch_timeout: float = 30.0
    #: The CurveZMQ server secret key of the replica's sockets (``_curve``); None: plain.
    curve_secretkey: str | None = field(default=None, repr=False)
    #: The kernelspec's container image (the host runs the replica in it); None: a process.
    image: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaExit:
    """A replica process ended."""

    kernel_id: str
    replica_id: str
    host: str
    #: None: the launcher could not learn it (``poll``/``wait`` then give -1).
    exit_code: int | None
    #: The end of its log, when the launcher has one (shown in the gateway's log).
    log_tail: str = ""


#: Told of every replica exit, once (the kernel manager's reconciliation).
ExitListener = Callable[[ReplicaExit], None]


class ReplicaProcess(Protocol):
    """One launched replica, as :class:`subprocess.Popen` is one process."""

    @property
    def replica_id(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def pid(self) -> int | None:
        """Its process id where it runs (None when the launcher has none to give)."""

    @property
    def connection(self) -> ConnectionInfo | None:
        """Where its Jupyter sockets (and Raft port) listen; None until known."""

    def poll(self) -> int | None:
        """Its exit code once it has exited, else None."""

    async def wait(self) -> int:
        """Wait until it has exited; its exit code."""

    async def send_signal(self, signum: int) -> None:
        """Send ``signum`` to its process group (``SIGINT``: interrupt the cell and the
        commands it started). Raises :class:`LaunchError`."""

    async def terminate(self, grace: float = 2.0) -> None:
        """Stop it: ``SIGTERM``, then ``SIGKILL`` after ``grace`` seconds. Raises
        :class:`LaunchError` (usually: it has exited already, or its host is gone)."""

    async def kill(self) -> None:
        """Stop it at once (``terminate`` without grace). Raises :class:`LaunchError`."""


class ReplicaLauncher(Protocol):
    """Starts replicas and gives handles to those that run (see the module's text)."""

    async def launch(self, spec: LaunchSpec) -> ReplicaProcess:
        """Start the replica and wait until it has reported its ports (within
        ``spec.launch_timeout``). Raises :class:`LaunchError`."""

    def attach(
        self, host: str, replica_id: str, pid: int | None, connection: ConnectionInfo | None
    ) -> ReplicaProcess:
        """A handle to a replica that already runs (found in the gateway's records after a
        restart, or listed by its host). It may have exited meanwhile: signals and stops
        then fail, and its exit is reported when the launcher learns of it."""
