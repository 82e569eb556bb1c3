"""Start, stop and signal one replica of a kernel: the launcher (``_launcher``), the kernel's
record and its ZMQ links kept in step.

This module decides what a replica is started with (argv from the kernelspec; environment:
the kernelspec's, the client's ``KERNEL_*``, and ``nbcluster.envvars``) and writes the
replica's ``ReplicaRecord`` (``state``, ``pid``, ``connection``) as it starts, runs and stops.
It does not decide where replicas go (the scheduler, through ``_membership``) or when they
are replaced (``_recovery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import zmq

from .. import envvars
from .._curve import new_server_secret
from ..hostproto import ConnectionInfo
from ..identity import KernelTokens
from ._config import GatewayConfig
from ._errors import KernelStartError, KernelUnavailable
from ._kernel import GatewayKernel
from ._kernelspecs import KernelSpecRegistry
from ._launcher import LaunchError, LaunchSpec, ReplicaLauncher, ReplicaProcess
from ._state import ReplicaRecord

__all__ = ["Replicas"]

log = logging.getLogger(__name__)


class Replicas:
    """Owned by the kernel manager; used by its start, membership and recovery modules."""

    def __init__(
        self,
        config: GatewayConfig,
        specs: KernelSpecRegistry,
        launcher: ReplicaLauncher,
        kernel_tokens: KernelTokens,
    ) -> None:
        self._config = config
        #: Each kernel's replicas get a token scoped to that kernel (its %%job magics).
        self._kernel_tokens = kernel_tokens
        self._specs = specs
        self._launcher = launcher
        #: The ZMQ context of every replica link.
        self.zmq_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def launch_spec(
        self,
        kernel: GatewayKernel,
        host: str,
        replica_id: str,
        devices: tuple[int, ...] | None = None,
    ) -> LaunchSpec:
        """What the replica ``replica_id`` of ``kernel`` is started with on ``host``.
        ``devices``: GPUs it holds for its whole life (``reservation``)."""
        spec = self._specs.get(kernel.record.name)
        assert spec is not None
        config = self._config
        env = {
            **spec.env,
            **kernel.record.env,
            envvars.RAFT_PASSWORD.name: kernel.record.raft_password,
            envvars.STORE_URL.name: config.store_url or config.store_dir.as_uri(),
            envvars.STORE_THRESHOLD.name: str(config.store_threshold),
            # The job API for the kernel's %%job and %jobs magics: --public-url, else the
            # listening address (a wildcard one: loopback).
            envvars.GATEWAY_URL.name: config.advertised_url,
            envvars.GATEWAY_TOKEN.name: self._kernel_tokens.issue(kernel.id),
        }
        if devices is not None:
            visible = ",".join(map(str, devices))
            env |= {envvars.CUDA_VISIBLE_DEVICES.name: visible, envvars.GPUS.name: visible}
        return LaunchSpec(
            kernel_id=kernel.id,
            replica_id=replica_id,
            host=host,
            argv=tuple(spec.argv),
            env=env,
            key=kernel.record.key,
            working_dir=kernel.record.working_dir,
            launch_timeout=kernel.record.launch_timeout or config.launch_timeout,
            # A fresh keypair per replica; only the public half comes back (ConnectionInfo).
            curve_secretkey=new_server_secret() if config.curve else None,
            image=spec.image,
        )

    async def launch(
        self,
        kernel: GatewayKernel,
        host: str,
        replica_id: str,
        joining: bool = False,
        devices: tuple[int, ...] | None = None,
    ) -> ReplicaRecord:
        """Start one replica on ``host`` and wait until it answers. A ``joining`` replica (a
        replacement) stays ``starting`` until it has joined its group and caught up.
        ``devices``: GPUs it holds for its whole life (``reservation``)."""
        spec = self.launch_spec(kernel, host, replica_id, devices)
        replica = ReplicaRecord(replica_id=replica_id, host=host)
        kernel.record.replicas.append(replica)
        try:
            process = await self._launcher.launch(spec)
        except LaunchError as exc:
            replica.state = "dead"
            replica.reason = str(exc)
            raise KernelStartError(f"replica on host {host} failed to start: {exc}") from None
        replica.pid = process.pid
        replica.connection = process.connection
        replica.state = "starting" if joining else "running"
        link = kernel.make_link(self.zmq_context, replica)
        try:
            await kernel.wait_ready(link, spec.launch_timeout)
        except (TimeoutError, KernelUnavailable) as exc:
            raise KernelStartError(f"replica on host {host} did not become ready: {exc}") from None
        return replica

    def adopt(
        self,
        kernel: GatewayKernel,
        replica: ReplicaRecord,
        pid: int,
        connection: ConnectionInfo,
    ) -> None:
        """A replica not confirmed since the gateway restarted (``unknown``) is listed by its
        host: it runs, with that pid and those ports."""
        replica.state = "running"
        replica.pid = pid
        replica.connection = connection
        self._launcher.attach(replica.host, replica.replica_id, pid, connection)
        if replica.replica_id not in kernel.links:
            kernel.make_link(self.zmq_context, replica)

    def relink(self, kernel: GatewayKernel, replica: ReplicaRecord) -> None:
        """Reconnect to a replica found in the records of a restarted gateway: its state is
        ``unknown`` until its host lists it."""
        replica.state = "unknown"
        self._launcher.attach(replica.host, replica.replica_id, replica.pid, replica.connection)
        kernel.make_link(self.zmq_context, replica)

    def _process(self, replica: ReplicaRecord) -> ReplicaProcess:
        return self._launcher.attach(
            replica.host, replica.replica_id, replica.pid, replica.connection
        )

    async def stop(self, kernel: GatewayKernel, replica: ReplicaRecord) -> None:
        """Stop one replica: a ``shutdown_request`` first (it exits cleanly), then its
        launcher stops the process. Its exit is expected from now on (``stopped``)."""
        was_live = replica.state in ("running", "unknown", "starting")
        replica.state = "stopped"  # its exit is expected from now on
        link = kernel.links.get(replica.replica_id)
        if was_live and link is not None:
            with contextlib.suppress(TimeoutError, KernelUnavailable, ConnectionError):
                await kernel.request(link, "control", "shutdown_request", {"restart": False}, 1.0)
        kernel.drop_link(replica.replica_id)
        if not was_live:
            return
        try:
            await self._process(replica).terminate(grace=2.0)
        except LaunchError as exc:
            # Usually: it already exited after the shutdown request, or its host is gone.
            log.debug("stop of replica %s: %s", replica.replica_id, exc)

    async def stop_all(self, kernel: GatewayKernel) -> None:
        await asyncio.gather(
            *(self.stop(kernel, r) for r in kernel.record.replicas),
            return_exceptions=True,
        )

    async def signal(self, replica: ReplicaRecord, signum: int) -> None:
        """Send ``signum`` to the replica's process group. Raises ``LaunchError``."""
        await self._process(replica).send_signal(signum)

    def close(self) -> None:
        self.zmq_context.destroy(linger=0)
