"""Starting, signalling and stopping kernel replicas on this host.

A replica is a process, in its own session (process group), so interrupts and stops reach the
processes its user code started too; or, when its kernelspec names an image and this host has
a container runtime, a container (``_containers``), handled through the same Popen-shaped
handle. Output goes to a log file per replica, whose tail is reported when the replica fails
to start or exits.

The connection file (owner-only, in the host's run directory) carries the kernel's HMAC key
and, when the gateway sent one, the CurveZMQ server keypair of the replica's sockets
(``docs/security.md``, "Encrypted transport"); neither goes on a command line or in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import envvars
from .._curve import public_key_of
from ..hostproto import ConnectionInfo, ReplicaExited, ReplicaReport, StartReplica
from ._containers import MOUNT, ContainerRuntimeError
from ._runtimes import ContainerRuntime, ReplicaHandle

__all__ = ["ReplicaProcess", "ReplicaStartError", "ReplicaSupervisor"]

log = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 4000
#: Environment variables of the host daemon that must never reach user code.
_SECRET_ENV = frozenset(v.name for v in envvars.ALL if v.secret)


class ReplicaStartError(RuntimeError):
    """A replica did not come up; the message says why and includes the end of its log."""


class _ProcessGroup:
    """A replica process and its session, as a :class:`ReplicaHandle`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    async def release(self) -> None:
        # Processes the user's code started stay in the replica's group: end them too.
        self.send_signal(signal.SIGKILL)


@dataclass
class ReplicaProcess:
    kernel_id: str
    replica_id: str
    process: ReplicaHandle
    connection: ConnectionInfo
    log_path: Path
    stop_requested: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def report(self) -> ReplicaReport:
        return ReplicaReport(
            kernel_id=self.kernel_id,
            replica_id=self.replica_id,
            pid=self.pid,
            connection=self.connection,
        )


def _write_private(path: Path, info: Mapping[str, object]) -> None:
    """Write a connection file readable by its owner only (it holds the kernel's keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _remove_tree(path: Path) -> None:
    """Remove a replica's directory (its connection file, FIFOs)."""
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class ReplicaSupervisor:
    """Owns the replica processes of one host daemon.

    The daemon calls :meth:`start`, :meth:`signal`, :meth:`stop` when the gateway asks, and
    :meth:`stop_all` when it shuts down; ``on_exit`` is awaited whenever a replica ends.
    """

    def __init__(
        self,
        *,
        address: str,
        run_dir: Path,
        log_dir: Path,
        default_working_dir: Path,
        on_exit: Callable[[ReplicaExited], Awaitable[None]],
        gateway_env: Mapping[str, str] | None = None,
        containers: ContainerRuntime | None = None,
    ) -> None:
        self._address = address
        #: Runs replicas whose kernelspec names an image; None: this host runs none.
        self._containers = containers
        #: How replicas reach the gateway from this machine (URL, CA): replaces the gateway's.
        self._gateway_env = dict(gateway_env or {})
        self._run_dir = run_dir
        self._log_dir = log_dir
        self._default_cwd = default_working_dir
        self._on_exit = on_exit
        self.replicas: dict[str, ReplicaProcess] = {}
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_dir.mkdir(parents=True, exist_ok=True)

    def reports(self) -> list[ReplicaReport]:
        return [r.report() for r in self.replicas.values() if r.process.returncode is None]

    def _argv(self, request: StartReplica, connection_file: Path) -> list[str]:
        argv = [a.replace("{connection_file}", str(connection_file)) for a in request.argv]
        # Like jupyter_client: a kernelspec's "python" means the interpreter running us.
        if argv[0] in {"python", "python3", f"python{sys.version_info[0]}"}:
            argv[0] = sys.executable
        return argv

    def _env(self, request: StartReplica, report_fd: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env.update(request.env)
        env.update(self._gateway_env)
        env.update(
            {
                envvars.KERNEL_ID.name: request.kernel_id,
                envvars.REPLICA_ID.name: request.replica_id,
                envvars.REPORT_FD.name: str(report_fd),
                envvars.PARENT_PID.name: str(os.getpid()),
                "JPY_PARENT_PID": str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _working_dir(self, request: StartReplica) -> Path:
        if request.working_dir:
            candidate = Path(request.working_dir).expanduser()
            if candidate.is_dir():
                return candidate
            log.info(
                "working dir %s does not exist on this host; using %s",
                candidate,
                self._default_cwd,
            )
        return self._default_cwd

    def _connection_info(self, request: StartReplica) -> tuple[dict[str, str | int], str | None]:
        info: dict[str, str | int] = {
            "ip": self._address,
            "transport": "tcp",
            "key": request.key,
            "signature_scheme": request.signature_scheme,
            "shell_port": 0,
            "iopub_port": 0,
            "stdin_port": 0,
            "control_port": 0,
            "hb_port": 0,
        }
        curve_public = None
        if request.curve_secretkey is not None:
            # Jupyter's convention (ipykernel >= 7.3 reads both and serves CURVE with them).
            curve_public = public_key_of(request.curve_secretkey)
            info["curve_publickey"] = curve_public
            info["curve_secretkey"] = request.curve_secretkey
        return info, curve_public

    async def start(self, request: StartReplica) -> ReplicaProcess:
        """Start a replica and wait until it has bound its sockets.

        Raises :class:`ReplicaStartError` if it exits or stays silent past the launch timeout.
        """
        if request.replica_id in self.replicas:
            raise ReplicaStartError(f"replica {request.replica_id} is already running here")
        if request.image is not None:
            return await self._start_container(request, request.image)
        connection_file = self._run_dir / f"kernel-{request.replica_id}.json"
        info, curve_public = self._connection_info(request)
        _write_private(connection_file, info)
        log_path = self._log_dir / f"{request.replica_id}.log"
        read_fd, write_fd = os.pipe()
        try:
            with log_path.open("ab") as log_file:
                process = await asyncio.create_subprocess_exec(
                    *self._argv(request, connection_file),
                    env=self._env(request, write_fd),
                    cwd=self._working_dir(request),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
        except OSError as exc:
            os.close(read_fd)
            connection_file.unlink(missing_ok=True)  # it holds the kernel's keys
            raise ReplicaStartError(f"could not run {request.argv[0]!r}: {exc}") from None
        finally:
            os.close(write_fd)
        handle = _ProcessGroup(process)
        return await self._await_ready(
            request, handle, read_fd, curve_public, log_path, cleanup=connection_file.unlink
        )

    async def _start_container(self, request: StartReplica, image: str) -> ReplicaProcess:
        """A replica whose kernelspec names an image: a container of it (``_containers``)."""
        if self._containers is None:
            raise ReplicaStartError(
                f"kernelspec image {image!r}: this host runs no containers "
                "(start its daemon with --container-runtime docker or kubernetes)"
            )
        replica_dir, curve_public, gateway_ca = self._make_replica_dir(request)
        # Read-write opens of a FIFO do not wait for the other end. The report's read end
        # stays open until the replica reported; the lifeline's for the replica's life.
        read_fd = os.open(replica_dir / "report", os.O_RDWR | os.O_NONBLOCK)
        lifeline_fd = os.open(replica_dir / "lifeline", os.O_RDWR)
        log_path = self._log_dir / f"{request.replica_id}.log"
        argv = [a.replace("{connection_file}", f"{MOUNT}/connection.json") for a in request.argv]
        env = {
            **request.env,
            **self._gateway_env,
            envvars.KERNEL_ID.name: request.kernel_id,
            envvars.REPLICA_ID.name: request.replica_id,
            envvars.REPORT_PATH.name: f"{MOUNT}/report",
            envvars.LIFELINE_PATH.name: f"{MOUNT}/lifeline",
            "PYTHONUNBUFFERED": "1",
        }
        if gateway_ca is not None:
            env[envvars.GATEWAY_CA.name] = gateway_ca
        try:
            container = await self._containers.run(
                image=image,
                argv=argv,
                env=env,
                replica_dir=replica_dir,
                kernel_id=request.kernel_id,
                replica_id=request.replica_id,
                lifeline_fd=lifeline_fd,
            )
        except ContainerRuntimeError as exc:
            os.close(read_fd)
            os.close(lifeline_fd)
            _remove_tree(replica_dir)
            raise ReplicaStartError(str(exc)) from None
        self._containers.follow_logs(container, log_path)
        return await self._await_ready(
            request,
            container,
            read_fd,
            curve_public,
            log_path,
            cleanup=lambda: _remove_tree(replica_dir),
        )

    def _make_replica_dir(self, request: StartReplica) -> tuple[Path, str | None, str | None]:
        """A directory per replica, mounted into its container: what a process would inherit
        (its connection file, the FIFOs of its report and lifeline, the gateway's CA). Returns
        it, the replica's CURVE public key and the CA's path in the container."""
        assert self._containers is not None
        replica_dir = self._run_dir / request.replica_id
        if replica_dir.exists():  # left by a daemon that died
            _remove_tree(replica_dir)
        replica_dir.mkdir(mode=0o700)
        info, curve_public = self._connection_info(request)
        _write_private(replica_dir / "connection.json", info)
        gateway_ca = self._gateway_env.get(envvars.GATEWAY_CA.name)
        ca_in_container = None
        if gateway_ca is not None:
            # The CA file is a path on this host: the container gets a copy beside its keys.
            (replica_dir / "gateway-ca.pem").write_bytes(Path(gateway_ca).read_bytes())
            ca_in_container = f"{MOUNT}/gateway-ca.pem"
        os.mkfifo(replica_dir / "report", 0o600)
        os.mkfifo(replica_dir / "lifeline", 0o600)
        owner = self._containers.owner()
        if owner is not None:
            for path in (replica_dir, *replica_dir.iterdir()):
                os.chown(path, *owner)
        return replica_dir, curve_public, ca_in_container

    async def _await_ready(
        self,
        request: StartReplica,
        handle: ReplicaHandle,
        read_fd: int,
        curve_public: str | None,
        log_path: Path,
        cleanup: Callable[[], object],
    ) -> ReplicaProcess:
        try:
            report = await self._read_report(read_fd, handle, request.launch_timeout)
            if curve_public is not None and not report.get("curve"):
                # Its sockets would be plain: the gateway could not talk to them, and must not.
                raise ReplicaStartError(
                    "the replica does not serve CurveZMQ (its ipykernel is older than 7.3?)"
                )
        except ReplicaStartError as exc:
            await self._kill(handle, grace=0.0)
            await handle.release()
            with contextlib.suppress(OSError):
                cleanup()  # the connection file holds the kernel's keys
            tail = _log_tail(log_path)
            raise ReplicaStartError(f"{exc}\n--- replica log ---\n{tail}") from None
        connection = ConnectionInfo(
            # A replica pod's sockets are on its own IP, not on the host's.
            ip=getattr(handle, "address", None) or self._address,
            transport="tcp",
            shell_port=report["shell_port"],
            iopub_port=report["iopub_port"],
            stdin_port=report["stdin_port"],
            control_port=report["control_port"],
            hb_port=report["hb_port"],
            raft_port=report.get("raft_port"),
            curve_publickey=curve_public,
        )
        replica = ReplicaProcess(
            request.kernel_id, request.replica_id, handle, connection, log_path
        )
        self.replicas[request.replica_id] = replica
        replica.watcher = asyncio.create_task(self._watch(replica, cleanup))
        return replica

    async def _read_report(
        self, read_fd: int, process: ReplicaHandle, timeout: float
    ) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb")
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        # A pipe ends when the process exits; a container's FIFO, which this end also holds
        # open for writing, never does: its end is watched too.
        line_read = asyncio.ensure_future(reader.readline())
        exited = asyncio.ensure_future(process.wait())
        try:
            done, _ = await asyncio.wait(
                {line_read, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if line_read in done:
                line = line_read.result()
            elif exited in done:
                line = b""
            else:
                raise ReplicaStartError(f"replica did not report its ports within {timeout:.0f} s")
        finally:
            line_read.cancel()
            exited.cancel()
            transport.close()
        if not line:
            code = await process.wait()
            raise ReplicaStartError(f"replica process exited with code {code} before it was ready")
        try:
            report = json.loads(line)
            ports = {
                k: int(report[k])
                for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
            }
            if report.get("raft_port") is not None:
                ports["raft_port"] = int(report["raft_port"])
            ports["curve"] = int(report.get("curve") is True)
            return ports
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicaStartError(f"replica sent an unreadable port report: {exc}") from None

    async def _watch(self, replica: ReplicaProcess, cleanup: Callable[[], object]) -> None:
        code = await replica.process.wait()
        await replica.process.release()
        self.replicas.pop(replica.replica_id, None)
        with contextlib.suppress(OSError):
            cleanup()  # the connection file holds the kernel's keys
        event = ReplicaExited(
            kernel_id=replica.kernel_id,
            replica_id=replica.replica_id,
            exit_code=code,
            requested=replica.stop_requested,
            log_tail="" if replica.stop_requested else _log_tail(replica.log_path),
        )
        log.info("replica %s exited with code %s", replica.replica_id, code)
        try:
            await self._on_exit(event)
        except Exception:
            log.exception("could not report the exit of replica %s", replica.replica_id)

    def signal(self, replica_id: str, signum: int) -> None:
        self._get(replica_id).process.send_signal(signum)

    async def stop(self, replica_id: str, grace: float) -> int | None:
        replica = self._get(replica_id)
        replica.stop_requested = True
        code = await self._kill(replica.process, grace)
        if replica.watcher is not None:
            await replica.watcher
        return code

    async def stop_all(self, grace: float = 3.0) -> None:
        for replica in list(self.replicas.values()):
            replica.stop_requested = True
        await asyncio.gather(
            *(self.stop(rid, grace) for rid in list(self.replicas)), return_exceptions=True
        )

    def _get(self, replica_id: str) -> ReplicaProcess:
        try:
            return self.replicas[replica_id]
        except KeyError:
            raise LookupError(f"no replica {replica_id} runs on this host") from None

    @staticmethod
    async def _kill(process: ReplicaHandle, grace: float) -> int | None:
        if process.returncode is not None:
            return process.returncode
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if grace <= 0 and sig == signal.SIGTERM:
                continue
            process.send_signal(sig)
            try:
                return await asyncio.wait_for(process.wait(), wait)
            except TimeoutError:
                continue
        return process.returncode
