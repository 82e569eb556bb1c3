"""Kernel replicas as containers: for kernelspecs that name an image.

Who calls what: the host daemon, started with ``--container-runtime docker``, gives its
:class:`~nbcluster.host._processes.ReplicaSupervisor` a :class:`DockerReplicaRuntime`; the
supervisor calls :meth:`DockerReplicaRuntime.run` for a ``StartReplica`` that carries an
``image`` and then treats the returned :class:`ContainerReplica` like a process (it is shaped
like ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``wait()``, signals).

How a replica in a container talks to its host daemon, since it inherits no descriptor and
cannot see the daemon's pid: the daemon makes a directory per replica, mounted at
:data:`MOUNT` in the container, holding the connection file (the kernel's keys, owner-only)
and two FIFOs: ``report``, on which the replica writes its ports (``NBCLUSTER_REPORT_PATH``),
and ``lifeline``, which the daemon holds open for the replica's life (``NBCLUSTER_LIFELINE_PATH``):
when the daemon dies the replica reads end of file and exits, as a process replica would with
``PR_SET_PDEATHSIG``.

The container uses the host's network (its sockets listen on the host's ``--address``, where
the gateway and the other replicas reach them, as for a process), gets every GPU the host
offers (device indices inside match the host's; ``CUDA_VISIBLE_DEVICES`` per cell binds, as
for processes), the object store's directory when the store is a local one, and nothing else
of the host. Its environment is the kernel's (``StartReplica.env``), not the daemon's.

The Docker SDK's calls block: they run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .. import envvars

__all__ = ["MOUNT", "ContainerReplica", "ContainerRuntimeError", "DockerReplicaRuntime"]

log = logging.getLogger(__name__)

#: Where the replica's directory (connection file, FIFOs) is mounted in its container.
MOUNT = "/run/nbcluster"
#: The image user the replica runs as when the daemon runs as root (the nbcluster image's
#: ``nbcluster`` user): never root in the container.
DEFAULT_CONTAINER_USER = "1000:1000"
#: Labels on every replica container, so that a restarted daemon finds what it left behind.
LABEL_HOST = "nbcluster.host"
LABEL_KERNEL = "nbcluster.kernel"
LABEL_REPLICA = "nbcluster.replica"
LABEL_ROLE = "nbcluster.role"


class ContainerRuntimeError(RuntimeError):
    """The container engine refused or failed; the message says what and where."""


def _docker() -> Any:
    """The ``docker`` package, imported on first use (``Any``: it is untyped)."""
    return importlib.import_module("docker")


@dataclass(eq=False)
class ContainerReplica:
    """One replica's container, shaped like ``asyncio.subprocess.Process``."""

    container: Any = field(repr=False)
    name: str
    pid: int
    #: The daemon's end of the lifeline FIFO: closed when the replica ends (or the daemon dies).
    lifeline_fd: int = field(repr=False)
    returncode: int | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _waiter: asyncio.Task[None] | None = field(default=None, repr=False)

    def start_waiting(self) -> None:
        """Watch for the container's end (called once, by :meth:`DockerReplicaRuntime.run`)."""
        self._waiter = asyncio.create_task(self._wait_for_exit())

    async def _wait_for_exit(self) -> None:
        try:
            result = await asyncio.to_thread(self.container.wait)
            self.returncode = int(result.get("StatusCode", -1))
        except Exception as exc:  # the engine went away or removed the container
            log.warning("lost track of replica container %s: %s", self.name, exc)
            self.returncode = -1
        finally:
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the replica (the container's main process): in a thread, so
        the caller does not block on the engine; a container already gone is ignored."""

        def deliver() -> None:
            try:
                self.container.kill(signal=int(signum))
            except Exception as exc:
                log.info("signal %d to %s not delivered: %s", signum, self.name, exc)

        threading.Thread(target=deliver, name=f"signal-{self.name}", daemon=True).start()

    async def release(self) -> None:
        """After its end: close the lifeline and remove the container."""
        with contextlib.suppress(OSError):
            os.close(self.lifeline_fd)
        try:
            await asyncio.to_thread(self.container.remove, force=True)
        except Exception as exc:
            log.info("could not remove replica container %s: %s", self.name, exc)


class DockerReplicaRuntime:
    """Runs replica containers on one Docker engine (``DOCKER_HOST`` or the local socket)."""

    name = "docker"

    def __init__(
        self,
        host_name: str,
        *,
        gpu_devices: tuple[int, ...] | None = None,
        container_user: str | None = None,
        client: Any = None,
    ) -> None:
        self._host = host_name
        self._gpu_devices = gpu_devices
        # Never root in the container: the daemon's own user when it is not root (its files
        # are then readable there as they are here), else the image's unprivileged user.
        if container_user is None:
            uid = os.geteuid()
            container_user = DEFAULT_CONTAINER_USER if uid == 0 else f"{uid}:{os.getegid()}"
        self.user = container_user
        self._client = client

    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = _docker().from_env()
            except Exception as exc:
                raise ContainerRuntimeError(
                    f"cannot reach the Docker engine (DOCKER_HOST or /var/run/docker.sock): {exc}"
                ) from None
        return self._client

    async def check(self) -> None:
        """Fail now, with the reason, when the engine does not answer (daemon start-up)."""
        try:
            await asyncio.to_thread(self.client().ping)
        except ContainerRuntimeError:
            raise
        except Exception as exc:
            raise ContainerRuntimeError(f"the Docker engine does not answer: {exc}") from None

    async def remove_leftovers(self) -> list[str]:
        """Remove the replica containers an earlier run of this host daemon left (it died
        without stopping them); returns their names. Their replicas were lost with it."""

        def remove() -> list[str]:
            found = self.client().containers.list(
                all=True, filters={"label": [f"{LABEL_HOST}={self._host}", f"{LABEL_ROLE}=replica"]}
            )
            names = []
            for container in found:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
                    names.append(container.name)
            return names

        return await asyncio.to_thread(remove)

    def owner(self) -> tuple[int, int] | None:
        """The uid and gid the replica's files must belong to, when the daemon has to hand
        them over (it runs as root and the container does not); None otherwise."""
        if os.geteuid() != 0:
            return None
        uid, _, gid = self.user.partition(":")
        try:
            return int(uid), int(gid or uid)
        except ValueError:
            return None  # a user name: the operator's image decides; files stay root's

    async def run(
        self,
        *,
        image: str,
        argv: list[str],
        env: Mapping[str, str],
        replica_dir: Path,
        kernel_id: str,
        replica_id: str,
        lifeline_fd: int,
    ) -> ContainerReplica:
        """Start the container; returns once the engine started it (not once it is ready)."""
        docker = _docker()
        name = f"nbcluster-{self._host}-{replica_id}"[:128]
        mounts = [docker.types.Mount(MOUNT, str(replica_dir), type="bind")]
        store = _local_store_dir(env.get(envvars.STORE_URL.name))
        if store is not None:
            mounts.append(docker.types.Mount(str(store), str(store), type="bind"))
        device_requests = []
        if self._gpu_devices:
            # Every GPU the host offers, so that device indices in the container are the
            # host's: the per-cell binding (CUDA_VISIBLE_DEVICES) then means the same there.
            device_requests.append(
                docker.types.DeviceRequest(
                    device_ids=[str(i) for i in self._gpu_devices], capabilities=[["gpu"]]
                )
            )

        def start() -> Any:
            container = self.client().containers.run(
                image,
                # The kernelspec's argv whole: the image's entry point (``nbcluster`` in the
                # nbcluster image) is not the kernel's.
                entrypoint=argv,
                command=[],
                environment=dict(env),
                name=name,
                detach=True,
                network_mode="host",
                user=self.user,
                mounts=mounts,
                device_requests=device_requests or None,
                labels={
                    LABEL_ROLE: "replica",
                    LABEL_HOST: self._host,
                    LABEL_KERNEL: kernel_id,
                    LABEL_REPLICA: replica_id,
                },
                # A small init as PID 1: it forwards SIGINT/SIGTERM to the kernel (a PID 1
                # ignores signals it has no handler for) and reaps what the user's code starts.
                init=True,
                stdin_open=False,
            )
            container.reload()
            return container

        try:
            container = await asyncio.to_thread(start)
        except Exception as exc:
            raise ContainerRuntimeError(
                f"could not start a container of {image!r}: {exc}"
            ) from None
        replica = ContainerReplica(
            container=container,
            name=name,
            pid=int(container.attrs.get("State", {}).get("Pid") or 0),
            lifeline_fd=lifeline_fd,
        )
        replica.start_waiting()
        return replica

    def follow_logs(self, replica: ContainerReplica, log_path: Path) -> None:
        """Copy the container's output into the replica's log file until it ends (a thread)."""

        def copy() -> None:
            try:
                with log_path.open("ab") as out:
                    for chunk in replica.container.logs(stream=True, follow=True):
                        out.write(chunk)
                        out.flush()
            except Exception as exc:
                log.info("log of %s ended: %s", replica.name, exc)

        threading.Thread(target=copy, name=f"logs-{replica.name}", daemon=True).start()


def _local_store_dir(store_url: str | None) -> Path | None:
    """The object store's directory when it is a local one (``file://`` or a path), which the
    container must see at the same path; None for a network store (Redis, S3)."""
    if not store_url:
        return None
    parts = urlsplit(store_url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "" and store_url.startswith("/"):
        return Path(store_url)
    return None
