"""The websocket host daemons connect to (``/api/cluster/hosts/connect``).

A host speaks only for itself: a replica exit it reports must be of a replica it runs, and job
output and ends must be of the job's current run on that host (``JobManager`` fences them);
anything else is refused (logged, counted in ``nbcluster_host_events_refused_total``) and
changes nothing. A run that is not the job's current one is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from .._tasks import BackgroundTasks
from ..hostproto import (
    CancelJob,
    Heartbeat,
    Hello,
    HostProtocolError,
    JobExited,
    JobOutput,
    ReplicaExited,
    Reply,
    StopReplica,
    Welcome,
    decode_host_message,
    encode,
)
from ._close_reason import close_reason
from ._hosts import HostRegistry, HostRequestError, HostSession
from ._jobs import JobManager, Verdict
from ._manager import KernelManager

__all__ = ["serve_host"]

log = logging.getLogger(__name__)


async def serve_host(
    websocket: WebSocket,
    hosts: HostRegistry,
    kernels: KernelManager,
    heartbeat_interval: float,
    jobs: JobManager | None = None,
) -> None:
    """Register the host, then process its replies and events until it disconnects."""
    await websocket.accept()
    try:
        first = await asyncio.wait_for(_receive_frame(websocket), 10)
        hello = decode_host_message(first)
        if not isinstance(hello, Hello):
            raise HostProtocolError(f"expected a hello first, got {hello.type!r}")
    except (TimeoutError, HostProtocolError, WebSocketDisconnect, KeyError) as exc:
        log.warning("refused a host connection: %s", exc)
        with contextlib.suppress(Exception):
            await websocket.close(1008, close_reason(str(exc)))
        return
    send_lock = asyncio.Lock()

    async def send_frame(frame: str) -> None:
        async with send_lock:
            await websocket.send_text(frame)

    session = HostSession(hello.name, send_frame)
    try:
        entry = hosts.register(hello, session, time.monotonic())
    except ValueError as exc:
        log.warning("refused host %s: %s", hello.name, exc)
        await websocket.close(1008, close_reason(str(exc)))
        return
    await send_frame(encode(Welcome(heartbeat_interval=heartbeat_interval)))
    kernels.notifier.notify(
        "host_joined",
        "info",
        f"host/{hello.name}",
        f"host {hello.name} connected ({hello.resources.cpus} CPUs, "
        f"{len(hello.resources.gpus)} GPUs, {len(hello.replicas)} replicas running)",
        logger=log,
    )
    orphans = kernels.on_host_hello(entry, hello.replicas)
    stale_runs: list[tuple[str, int | None]] = []
    if jobs is not None:
        stale_runs = jobs.on_worker_hello(entry, hello.jobs, hello.job_attempts)
    for orphan in orphans:
        log.info("stopping replica %s on %s: it belongs to no known kernel", orphan, hello.name)
    stopping = BackgroundTasks(f"host {hello.name}", log)
    for orphan in orphans:
        stopping.spawn(f"stop orphan {orphan}", _stop_orphan(session, orphan))
    #: Runs this connection already asked the host to stop.
    stopped: set[tuple[str, int | None]] = set()

    async def act(verdict: Verdict) -> None:
        if verdict.ack is not None:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await send_frame(encode(verdict.ack))
        if verdict.stop is not None and verdict.stop not in stopped:
            stopped.add(verdict.stop)
            stopping.spawn(f"stop stale run {verdict.stop}", _stop_run(session, *verdict.stop))

    for run in stale_runs:
        await act(Verdict(stop=run))
    try:
        while True:
            try:
                message = decode_host_message(await _receive_frame(websocket))
            except HostProtocolError as exc:
                log.error("host %s: %s", hello.name, exc)
                kernels.metrics.reject("host", str(exc))
                continue
            if entry.state == "lost" or hosts.hosts.get(hello.name) is not entry:
                # Declared lost while this connection stayed open (a partition that healed):
                # make the host reconnect, so that its hello reconciles its replicas.
                log.warning(
                    "host %s is back after being declared lost; asking it to reconnect", hello.name
                )
                await websocket.close(4000, "host was declared lost; reconnect")
                break
            hosts.heartbeat(hello.name, time.monotonic())
            if isinstance(message, Reply):
                session.on_reply(message)
            elif isinstance(message, ReplicaExited):
                if _runs_replica(kernels, hello.name, message):
                    kernels.on_replica_exited(hello.name, message)
                else:
                    kernels.metrics.host_events_refused.labels("foreign").inc()
                    log.warning(
                        "host %s reported the exit of replica %s of kernel %s, which it does "
                        "not run; ignored",
                        hello.name,
                        message.replica_id,
                        message.kernel_id,
                    )
            elif isinstance(message, JobOutput):
                if jobs is not None:
                    await act(await jobs.on_output(hello.name, message))
            elif isinstance(message, JobExited):
                if jobs is not None:
                    await act(await jobs.on_exited(hello.name, message))
            elif isinstance(message, Heartbeat):
                pass
            else:
                log.error("host %s sent a second hello; ignoring it", hello.name)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await stopping.close()
        hosts.disconnect(hello.name, session, time.monotonic())
        if kernels.reconciler.stopping:
            # The gateway closed the connection itself: nothing to tell anyone.
            log.info("host %s disconnected (the gateway is stopping)", hello.name)
        else:
            kernels.notifier.notify(
                "host_disconnected",
                "warning",
                f"host/{hello.name}",
                f"host {hello.name} disconnected",
                logger=log,
            )
        if entry.state == "disconnected":
            await kernels.on_host_disconnected(entry)


async def _receive_frame(websocket: WebSocket) -> str:
    """The next frame's text. A binary frame is a :class:`HostProtocolError` (the protocol is
    JSON text; it once failed the connection with an unhandled ``KeyError``)."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:
        size = len(message.get("bytes") or b"")
        raise HostProtocolError(
            f"invalid host message: a binary frame ({size} bytes); the protocol is JSON text"
        )
    return str(text)


def _runs_replica(kernels: KernelManager, host: str, event: ReplicaExited) -> bool:
    """Whether ``host`` runs (or ran) the replica it reports: the kernel's record says so, or
    the launcher started it there."""
    kernel = kernels.kernels.get(event.kernel_id)
    replica = kernel.replica(event.replica_id) if kernel is not None else None
    if replica is not None:
        return replica.host == host
    return kernels.launcher.host_of(event.replica_id) == host


async def _stop_run(session: HostSession, job_id: str, attempt: int | None) -> None:
    with contextlib.suppress(HostRequestError):
        await session.request(
            lambda rid: CancelJob(
                request_id=rid, job_id=job_id, attempt=attempt, stale=True, grace=2.0
            ),
            timeout=30,
        )


async def _stop_orphan(session: HostSession, replica_id: str) -> None:
    with contextlib.suppress(HostRequestError):
        await session.request(
            lambda rid: StopReplica(request_id=rid, replica_id=replica_id, grace=2.0), timeout=10
        )
