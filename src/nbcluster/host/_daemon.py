"""The host daemon: one per machine, connected to the gateway by a websocket it opens itself.

It registers (hello), heartbeats, runs the gateway's start/stop/signal requests on its replicas
and reports replica exits. When the gateway goes away it keeps its replicas running and
reconnects, listing them in its next hello so that a restarted gateway can re-attach.

With an https gateway URL the websocket is wss and the gateway's certificate is verified
(against ``HostConfig.ca``, else the system's trust store); a certificate that does not verify
ends the daemon with :class:`HostRejected`, since retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from .. import envvars
from .._tasks import BackgroundTasks
from .._tls import client_context, is_loopback, unverified_reason
from ..hostproto import (
    MAX_FRAME_BYTES,
    CancelJob,
    GatewayRequest,
    Heartbeat,
    Hello,
    HostProtocolError,
    HostResources,
    JobExited,
    JobOutput,
    JobOutputAck,
    ReplicaExited,
    Reply,
    StartJob,
    StartReplica,
    StopReplica,
    Welcome,
    decode_gateway_message,
    encode,
)
from ._config import HostConfig
from ._containers import ContainerRuntimeError, DockerReplicaRuntime
from ._jobs import JobRunner
from ._kube_replicas import KubernetesReplicaRuntime
from ._outage import ConnectionOutage
from ._processes import ReplicaStartError, ReplicaSupervisor
from ._resources import discover_resources

__all__ = ["HostDaemon", "HostRejected"]

log = logging.getLogger(__name__)


class HostRejected(RuntimeError):
    """The gateway refused this host for good (bad token, duplicate name): retrying won't help."""


def _ws_url(gateway_url: str) -> str:
    base = gateway_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    return base + "/api/cluster/hosts/connect"


class HostDaemon:
    """Run with :meth:`run` until :meth:`stop` is called (the CLI wires SIGTERM/SIGINT to it)."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.resources: HostResources = discover_resources(
            config.name,
            virtual_gpu_count=config.virtual_gpus,
            default_virtual_gpus=config.default_virtual_gpus,
            gpu_devices=config.gpu_devices,
            cpus=config.cpus,
            memory_mb=config.memory_mb,
            pool=config.pool,
        )
        state = config.state_dir
        https = config.gateway_url.startswith("https://")
        #: Verifies the gateway (wss); None for a plain ws:// gateway.
        self._ssl: ssl.SSLContext | None = client_context(config.ca) if https else None
        # Replicas call the gateway's job API as this host reaches it: a URL that works from
        # this machine and matches the gateway's certificate, and the CA that verifies it.
        gateway_env = {envvars.GATEWAY_URL.name: config.gateway_url.rstrip("/")}
        if https and config.ca is not None:
            gateway_env[envvars.GATEWAY_CA.name] = str(config.ca.resolve())
        #: Runs the replicas of kernelspecs that name an image (``--container-runtime``):
        #: containers on the Docker engine, or pods beside this daemon's own pod.
        self.containers: DockerReplicaRuntime | KubernetesReplicaRuntime | None = None
        if config.container_runtime == "docker":
            self.containers = DockerReplicaRuntime(
                config.name, gpu_devices=config.gpu_devices, container_user=config.container_user
            )
        elif config.container_runtime == "kubernetes":
            try:
                self.containers = KubernetesReplicaRuntime(
                    config.name, container_user=config.container_user
                )
            except ValueError as exc:  # a --container-user a pod cannot run as
                raise HostRejected(f"--container-runtime kubernetes: {exc}") from None
        elif config.container_runtime is not None:
            raise ValueError(f"unknown container runtime {config.container_runtime!r}")
        self.supervisor = ReplicaSupervisor(
            address=config.address,
            run_dir=state / "run",
            log_dir=state / "logs",
            default_working_dir=config.working_dir,
            on_exit=self._report_exit,
            gateway_env=gateway_env,
            containers=self.containers,
        )
        self.jobs = JobRunner(state / "jobs", self._send_event)
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        #: Requests being handled, and jobs' ends being sent again after a reconnect.
        self._tasks = BackgroundTasks("host daemon", log)
        self.connected = asyncio.Event()
        self._outage = ConnectionOutage()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Connect, serve, reconnect on loss; on stop, end every replica and return."""
        self._warn_if_clear_text()
        if self.containers is not None:
            try:
                await self.containers.check()
            except ContainerRuntimeError as exc:
                raise HostRejected(f"--container-runtime {self.containers.name}: {exc}") from None
            # Replicas of an earlier run of this daemon: lost with it, and not to be adopted.
            for name in await self.containers.remove_leftovers():
                log.warning(
                    "removed replica %s (%s) left by an earlier run", name, self.containers.name
                )
        delay = 0.1
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    delay = 0.1
                except HostRejected:
                    raise
                except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                    hint = ""
                    if self._ssl is None and isinstance(exc, websockets.InvalidMessage):
                        hint = " (if the gateway serves TLS, use its https:// URL)"
                    if not self._stopping.is_set():
                        log.log(*self._outage.failed(exc, loop.time(), hint))
                if self._stopping.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, self.config.reconnect_max_delay)
        finally:
            await self._tasks.cancel_all()
            await self.jobs.stop_all()
            await self.supervisor.stop_all()

    def _warn_if_clear_text(self) -> None:
        host = urlsplit(self.config.gateway_url).hostname or ""
        if self._ssl is None and not is_loopback(host):
            log.warning(
                "!!! the gateway %s is reached over plain http: this host's token and every "
                "replica's keys cross the network in clear. Serve the gateway with TLS "
                "(--certfile/--keyfile) and pass its https:// URL (docs/security.md). !!!",
                self.config.gateway_url,
            )

    async def _session(self) -> None:
        headers = {"Authorization": f"token {self.config.token}"}
        try:
            ws = await connect(
                _ws_url(self.config.gateway_url),
                additional_headers=headers,
                max_size=MAX_FRAME_BYTES,
                open_timeout=10,
                ssl=self._ssl,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise HostRejected(
                    f"the gateway refused this host's token (HTTP {status})"
                ) from None
            raise
        except OSError as exc:
            reason = unverified_reason(exc)
            if reason is None:
                raise
            raise HostRejected(
                f"cannot verify the gateway's TLS certificate ({reason}): pass --ca FILE "
                "(or set NBCLUSTER_CA) with the CA that signed it"
            ) from None
        async with ws:
            hello = Hello(
                name=self.config.name,
                address=self.config.address,
                resources=self.resources,
                replicas=self.supervisor.reports(),
                jobs=self.jobs.job_ids(),
                job_attempts=self.jobs.job_attempts(),
            )
            await ws.send(encode(hello))
            first = await asyncio.wait_for(ws.recv(), 10)
            welcome = self._parse_welcome(first)
            # Unacknowledged output and ends go again on this connection.
            self.jobs.on_connected()
            self._ws = ws
            self.connected.set()
            self._outage.connected()
            log.info("registered with the gateway as %s", self.config.name)
            heartbeat = asyncio.create_task(self._heartbeat(welcome.heartbeat_interval))
            stopper = asyncio.create_task(self._stopping.wait())
            try:
                receiver = asyncio.create_task(self._receive(ws))
                done, _ = await asyncio.wait(
                    {receiver, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                receiver.cancel()
                for task in done:
                    if task is receiver and not task.cancelled() and task.exception():
                        raise task.exception()  # type: ignore[misc]
            finally:
                self._ws = None
                self.connected.clear()
                heartbeat.cancel()
                stopper.cancel()

    def _parse_welcome(self, frame: str | bytes) -> Welcome:
        try:
            message = decode_gateway_message(frame)
        except HostProtocolError as exc:
            raise HostRejected(f"gateway did not welcome this host: {exc}") from None
        if not isinstance(message, Welcome):
            raise HostRejected(f"gateway answered the hello with {message.type!r}")
        return message

    async def _receive(self, ws: ClientConnection) -> None:
        async for frame in ws:
            try:
                message = decode_gateway_message(frame)
            except HostProtocolError as exc:
                log.error("%s", exc)
                continue
            if isinstance(message, Welcome):
                continue
            if isinstance(message, JobOutputAck):
                self.jobs.on_ack(message)
                continue
            self._tasks.spawn(f"handle {message.type}", self._handle(message))

    async def _handle(self, request: GatewayRequest) -> None:
        try:
            if isinstance(request, StartJob):
                result: dict[str, Any] = await self.jobs.start(request)
            elif isinstance(request, CancelJob):
                result = await self.jobs.cancel(request)
            elif isinstance(request, StartReplica):
                replica = await self.supervisor.start(request)
                result = replica.report().model_dump()
            elif isinstance(request, StopReplica):
                code = await self.supervisor.stop(request.replica_id, request.grace)
                result = {"exit_code": code}
            else:
                self.supervisor.signal(request.replica_id, signal.Signals(request.signum))
                result = {}
            reply = Reply(request_id=request.request_id, ok=True, result=result)
        except (ReplicaStartError, LookupError, ValueError, OSError, RuntimeError) as exc:
            reply = Reply(request_id=request.request_id, ok=False, error=str(exc))
        await self._send(encode(reply))

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._send(encode(Heartbeat(replicas=len(self.supervisor.replicas))))

    async def _report_exit(self, event: ReplicaExited) -> None:
        await self._send(encode(event))

    async def _send_event(self, event: JobOutput | JobExited) -> bool:
        return await self._send(encode(event))

    async def _send(self, frame: str) -> bool:
        """Send a frame; False when disconnected (the next hello tells the gateway what
        still runs, and jobs send again what the gateway did not acknowledge)."""
        ws = self._ws
        if ws is None:
            return False
        async with self._send_lock:
            try:
                await ws.send(frame)
            except websockets.ConnectionClosed:
                return False
        return self._ws is ws
