"""The websocket host daemons connect to (``/api/cluster/hosts/connect``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from .._tasks import BackgroundTasks
from ..hostproto import (
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
from ._hosts import HostRegistry, HostRequestError, HostSession
from ._jobs import JobManager
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
        first = await asyncio.wait_for(websocket.receive_text(), 10)
        hello = decode_host_message(first)
        if not isinstance(hello, Hello):
            raise HostProtocolError(f"expected a hello first, got {hello.type!r}")
    except (TimeoutError, HostProtocolError, WebSocketDisconnect, KeyError) as exc:
        log.warning("refused a host connection: %s", exc)
        with contextlib.suppress(Exception):
            await websocket.close(1008, str(exc)[:120])
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
        await websocket.close(1008, str(exc)[:120])
        return
    await send_frame(encode(Welcome(heartbeat_interval=heartbeat_interval)))
    log.info(
        "host %s connected (%d CPUs, %d GPUs, %d replicas running)",
        hello.name,
        hello.resources.cpus,
        len(hello.resources.gpus),
        len(hello.replicas),
    )
    orphans = kernels.on_host_hello(entry, hello.replicas)
    if jobs is not None:
        jobs.on_worker_hello(entry, hello.jobs)
    for orphan in orphans:
        log.info("stopping replica %s on %s: it belongs to no known kernel", orphan, hello.name)
    stopping = BackgroundTasks(f"host {hello.name}", log)
    for orphan in orphans:
        stopping.spawn(f"stop orphan {orphan}", _stop_orphan(session, orphan))
    try:
        while True:
            frame = await websocket.receive_text()
            try:
                message = decode_host_message(frame)
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
                kernels.on_replica_exited(hello.name, message)
            elif isinstance(message, JobOutput):
                if jobs is not None:
                    jobs.on_output(hello.name, message)
            elif isinstance(message, JobExited):
                if jobs is not None:
                    jobs.on_exited(hello.name, message)
            elif isinstance(message, Heartbeat):
                pass
            else:
                log.error("host %s sent a second hello; ignoring it", hello.name)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await stopping.close()
        hosts.disconnect(hello.name, session, time.monotonic())
        log.warning("host %s disconnected", hello.name)
        if entry.state == "disconnected":
            await kernels.on_host_disconnected(entry)


async def _stop_orphan(session: HostSession, replica_id: str) -> None:
    with contextlib.suppress(HostRequestError):
        await session.request(
            lambda rid: StopReplica(request_id=rid, replica_id=replica_id, grace=2.0), timeout=10
        )
