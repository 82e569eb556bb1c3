"""Host daemons as containers on one Docker engine (``nbcluster gateway --hosts-from docker``):
for one big GPU server, each host daemon a container with its share of the GPUs.

Each host is one container, ``nbcluster-<gateway id>-<host name>``, labelled
``nbcluster.provider=docker``, ``nbcluster.gateway=<gateway id>`` and ``nbcluster.host=<name>``
(``_container_hosts``); its restart policy is ``unless-stopped``, so the engine restarts a host
daemon that crashes. The join token is in the container's environment (``NBCLUSTER_JOIN_TOKEN``,
set through the engine's API, never on a command line; anyone who may ``docker inspect`` it
controls the engine anyway). With real GPUs (``gpus="nvidia"``) each container gets
``gpus_per_host`` of ``gpu_devices`` through a device request, and the host daemon finds them with
NVML; the devices given are in the ``nbcluster.gpus`` label, so a restarted gateway knows them.

A restarted gateway finds its containers by their labels (:meth:`discover`): it owns them,
counts their names on, and stops them when they idle. By default the containers outlive the
gateway (``stop_on_exit`` False): their daemons reconnect to a restarted gateway, which
re-attaches their kernels. Only containers with this gateway's labels are ever stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .. import envvars
from ._container_hosts import (
    LABEL_GPUS,
    LABEL_HOST,
    ContainerHostProvider,
    docker_call,
    docker_module,
)
from ._errors import HostProviderError

__all__ = ["DockerHostProvider"]

log = logging.getLogger(__name__)

#: Container states in which a host daemon runs or is about to.
_LIVE = ("created", "running", "restarting")


@dataclass
class _Container:
    id: str
    status: str
    gpus: tuple[int, ...] = ()

    @property
    def live(self) -> bool:
        return self.status in _LIVE


class DockerHostProvider(ContainerHostProvider[_Container]):
    """Host daemons as containers of ``template.settings.image`` on the engine ``client``
    talks to (default: ``docker.from_env()``: ``DOCKER_HOST`` or the local socket)."""

    name = "docker"
    _kind = "host container"
    _stop_verb = "stop"
    _log = log

    # -- finding what a previous run started ----------------------------------------------------

    async def _discover(self) -> None:
        def listing() -> list[Any]:
            return list(self.client().containers.list(all=True, filters=self.template.filters()))

        found = await asyncio.to_thread(docker_call, "list host containers", listing)
        containers: dict[str, _Container] = {}
        for container in found:
            labels = container.labels or {}
            name = labels.get(LABEL_HOST)
            if not name:
                continue
            gpus = tuple(int(g) for g in labels.get(LABEL_GPUS, "").split(",") if g.isdigit())
            containers[name] = _Container(container.id, container.status, gpus)
        for name in sorted(set(self._hosts) - set(containers)):
            log.warning("host container %s is gone (removed outside nbcluster)", name)
        self._adopt(containers)

    # -- HostProvider ---------------------------------------------------------------------------

    async def _start(self, count: int) -> list[str]:
        names: list[str] = []
        for _ in range(count):
            name = f"{self.settings.name_prefix}-{self._next}"
            try:
                gpus = self._free_gpus()
                container = await asyncio.to_thread(self._run, name, gpus)
            except HostProviderError as exc:
                if not names:
                    raise
                log.warning("started %d of %d host containers: %s", len(names), count, exc)
                break
            self._next += 1
            self._hosts[name] = _Container(container.id, "created", gpus)
            names.append(name)
            log.info("started host container %s (%s)", name, container.id[:12])
        return names

    def _free_gpus(self) -> tuple[int, ...]:
        """The engine's GPUs the next host gets (``nvidia``), those no host of ours holds."""
        if self.settings.gpus != "nvidia":
            return ()
        held = {g for c in self._hosts.values() if c.live for g in c.gpus}
        free = [g for g in self.settings.gpu_devices if g not in held]
        wanted = self.template.gpus_per_host
        if len(free) < wanted:
            raise HostProviderError(
                f"no GPUs left for another host: {wanted} per host, {len(free)} of "
                f"{len(self.settings.gpu_devices)} free"
            )
        return tuple(free[:wanted])

    def _run(self, name: str, gpus: tuple[int, ...]) -> Any:
        """Create and start the container of host ``name`` (in a thread)."""
        docker = docker_module()
        template = self.template
        address = self.settings.address or ("127.0.0.1" if template.host_network else None)
        network: dict[str, Any] = (
            {"network_mode": "host"}
            if template.host_network
            else {"network": self.settings.network}
        )
        labels = template.labels(name)
        device_requests = None
        if gpus:
            labels[LABEL_GPUS] = ",".join(map(str, gpus))
            device_requests = [
                docker.types.DeviceRequest(
                    driver="nvidia", device_ids=[str(g) for g in gpus], capabilities=[["gpu"]]
                )
            ]
        mounts = [
            docker.types.Mount(m.target, m.source, type=m.type, read_only=m.read_only)
            for m in template.mounts()
        ]
        return docker_call(
            f"start host container {name} from {self.settings.image}",
            lambda: self.client().containers.run(
                self.settings.image,
                command=template.args(name, address),
                entrypoint=template.entrypoint(address),
                name=template.resource_name(name),
                hostname=None if template.host_network else name,
                detach=True,
                environment={envvars.JOIN_TOKEN.name: self._join_token},
                labels=labels,
                mounts=mounts,
                device_requests=device_requests,
                restart_policy={"Name": "unless-stopped"},
                init=True,
                stdin_open=False,
                **network,
            ),
        )

    async def _stop(self, name: str, host: _Container) -> None:
        errors = docker_module().errors

        def stop() -> None:
            try:
                container = self.client().containers.get(host.id)
            except errors.NotFound:
                return
            container.stop(timeout=max(1, round(self.stop_grace)))
            with contextlib.suppress(errors.NotFound):
                container.remove(force=True)

        await asyncio.to_thread(docker_call, f"stop host container {name}", stop)
        log.info("stopped and removed host container %s", name)
