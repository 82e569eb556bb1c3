"""The replica launcher of host daemons: starts, signals and stops replicas by asking the
``nbcluster host`` daemon on the chosen host, over its websocket (``nbcluster.hostproto``).

The host daemon spawns the replica, waits for it to report its ports and answers with them;
it reports every exit (``ReplicaExited``), which the host endpoint passes to
:meth:`HostDaemonLauncher.host_reported_exit`. See :mod:`._launcher` for the interface.
"""

from __future__ import annotations

import asyncio

from ..hostproto import (
    ConnectionInfo,
    ReplicaExited,
    ReplicaReport,
    SignalReplica,
    StartReplica,
    StopReplica,
)
from ._hosts import HostRegistry, HostRequestError
from ._launcher import ExitListener, LaunchError, LaunchSpec, ReplicaExit

__all__ = ["HostDaemonLauncher", "HostReplicaProcess"]

#: Seconds a host has to answer a stop or a signal.
_STOP_TIMEOUT = 10.0
_SIGNAL_TIMEOUT = 5.0


class HostReplicaProcess:
    """A replica run by a host daemon (a :class:`._launcher.ReplicaProcess`)."""

    def __init__(
        self,
        hosts: HostRegistry,
        host: str,
        replica_id: str,
        pid: int | None,
        connection: ConnectionInfo | None,
    ) -> None:
        self._hosts = hosts
        self._host = host
        self._replica_id = replica_id
        self._pid = pid
        self._connection = connection
        self._returncode: int | None = None
        self._exited = asyncio.Event()

    @property
    def replica_id(self) -> str:
        return self._replica_id

    @property
    def host(self) -> str:
        return self._host

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def connection(self) -> ConnectionInfo | None:
        return self._connection

    def poll(self) -> int | None:
        return self._returncode if self._exited.is_set() else None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def exited(self, exit_code: int | None) -> None:
        """Its host reported its exit."""
        self._returncode = -1 if exit_code is None else exit_code
        self._exited.set()

    async def send_signal(self, signum: int) -> None:
        replica_id = self._replica_id
        try:
            await self._hosts.session(self._host).request(
                lambda rid: SignalReplica(request_id=rid, replica_id=replica_id, signum=signum),
                timeout=_SIGNAL_TIMEOUT,
            )
        except HostRequestError as exc:
            raise LaunchError(str(exc)) from None

    async def terminate(self, grace: float = 2.0) -> None:
        replica_id = self._replica_id
        try:
            await self._hosts.session(self._host).request(
                lambda rid: StopReplica(request_id=rid, replica_id=replica_id, grace=grace),
                timeout=_STOP_TIMEOUT,
            )
        except HostRequestError as exc:
            raise LaunchError(str(exc)) from None

    async def kill(self) -> None:
        await self.terminate(grace=0.0)


class HostDaemonLauncher:
    """A :class:`._launcher.ReplicaLauncher` over the connected host daemons."""

    def __init__(self, hosts: HostRegistry, on_exit: ExitListener) -> None:
        self._hosts = hosts
        self._on_exit = on_exit
        #: Handles of replicas not known to have exited, by replica id.
        self._processes: dict[str, HostReplicaProcess] = {}

    async def launch(self, spec: LaunchSpec) -> HostReplicaProcess:
        try:
            result = await self._hosts.session(spec.host).request(
                lambda rid: StartReplica(
                    request_id=rid,
                    kernel_id=spec.kernel_id,
                    replica_id=spec.replica_id,
                    argv=list(spec.argv),
                    env=dict(spec.env),
                    key=spec.key,
                    working_dir=spec.working_dir,
                    launch_timeout=spec.launch_timeout,
                    curve_secretkey=spec.curve_secretkey,
                    image=spec.image,
                ),
                # The host's own wait for the ports, and time for its answer to arrive.
                timeout=spec.launch_timeout + 5,
            )
        except HostRequestError as exc:
            raise LaunchError(str(exc)) from None
        report = ReplicaReport.model_validate(result)
        process = HostReplicaProcess(
            self._hosts, spec.host, spec.replica_id, report.pid, report.connection
        )
        self._processes[spec.replica_id] = process
        return process

    def attach(
        self, host: str, replica_id: str, pid: int | None, connection: ConnectionInfo | None
    ) -> HostReplicaProcess:
        process = self._processes.get(replica_id)
        if process is None or process.host != host:
            process = HostReplicaProcess(self._hosts, host, replica_id, pid, connection)
            self._processes[replica_id] = process
        return process

    def host_of(self, replica_id: str) -> str | None:
        """The host a replica not known to have exited was started on (or attached at)."""
        process = self._processes.get(replica_id)
        return process.host if process is not None else None

    def host_reported_exit(self, host: str, event: ReplicaExited) -> None:
        """A host daemon reported that one of its replicas exited."""
        process = self._processes.get(event.replica_id)
        if process is not None and process.host == host:
            del self._processes[event.replica_id]
            process.exited(event.exit_code)
        self._on_exit(
            ReplicaExit(event.kernel_id, event.replica_id, host, event.exit_code, event.log_tail)
        )
