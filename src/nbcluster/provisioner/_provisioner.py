"""``nbcluster-provisioner``: a jupyter_client kernel provisioner that runs a kernelspec's
kernels on nbcluster, so a stock Jupyter server (no ``--gateway-url``) offers them beside
its local kernels.

jupyter_client's ``KernelManager`` calls it (``pre_launch``, ``launch_kernel``, ``poll``,
``wait``, ``send_signal``, ``terminate``/``kill``, ``cleanup``); each call becomes a call of
the gateway's REST API, and the connection info it returns is the kernel's ZMQ face
(``GET /api/cluster/kernels/{id}/connection``), to which the manager and its clients then
connect directly.

A restart (``KernelManager.restart_kernel``) keeps the gateway's kernel and its face: the
shutdown half of it only marks the kernel as restarting (``poll`` reports the old process
gone) and ``launch_kernel`` asks the gateway to restart it, so the ports and keys stay.
``get_provisioner_info``/``load_provisioner_info`` carry the gateway's kernel id, so a
restarted Jupyter server re-attaches to the same kernel (its face's connection info is asked
for again: it is new if the gateway restarted meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, cast

import httpx
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from ..protocol import KernelConnection
from ._config import ProvisionerConfig
from ._gateway import GatewayApi, GatewayCallError

__all__ = ["NbclusterProvisioner"]

log = logging.getLogger(__name__)

#: What ``poll`` reports for a kernel that ended: shut down (asked for), or gone or dead
#: without being asked (the kernel restarter then restarts it).
_EXIT_SHUTDOWN = 0
_EXIT_LOST = 1
#: How often ``wait`` asks the gateway whether the kernel is gone.
_WAIT_INTERVAL = 0.5


class NbclusterProvisioner(KernelProvisionerBase):
    """Made by jupyter_client's provisioner factory with the kernelspec's
    ``kernel_provisioner.config`` as keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        traits = set(self.class_trait_names())
        stanza = {k: kwargs.pop(k) for k in list(kwargs) if k not in traits and k != "parent"}
        super().__init__(**kwargs)
        #: The kernelspec's config, validated (a wrong field fails the start, named).
        self.settings = ProvisionerConfig.from_stanza(stanza)
        #: The gateway's id of the kernel (not jupyter_client's ``kernel_id``).
        self.gateway_kernel_id: str | None = None
        self._exit_code: int | None = None
        self._shutdown_asked = False
        self._restarting = False
        #: The launch in progress (``launch_kernel``); None once it was abandoned.
        self._launch_attempt: object | None = None
        #: Shut-downs of kernels whose start was abandoned, kept until they are done.
        self._abandoned: set[asyncio.Future[None]] = set()
        #: Where the gateway calls go: None, the network (tests put a fake gateway here).
        self.transport: httpx.AsyncBaseTransport | None = None

    def _api(self) -> GatewayApi:
        return GatewayApi(self.settings, self.settings.token(), self.transport)

    # -- state --------------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.gateway_kernel_id is not None and self._exit_code is None

    async def poll(self) -> int | None:
        if self.gateway_kernel_id is None:
            return self._exit_code if self._exit_code is not None else _EXIT_SHUTDOWN
        if self._restarting:
            return _EXIT_SHUTDOWN  # the old "process" is gone; launch_kernel brings it back
        if self._exit_code is not None:
            return self._exit_code
        try:
            kernel = await self._api().kernel(self.gateway_kernel_id)
        except GatewayCallError as exc:
            # An unreachable gateway (restarting, say) is not a dead kernel.
            log.warning("nbcluster kernel %s: %s", self.gateway_kernel_id, exc)
            return None
        if kernel is None:
            self._exit_code = _EXIT_SHUTDOWN if self._shutdown_asked else _EXIT_LOST
            return self._exit_code
        if kernel.execution_state == "dead":
            return _EXIT_LOST  # restartable: the restarter's restart revives it
        return None

    async def wait(self) -> int | None:
        while True:
            code = await self.poll()
            if code is not None:
                return code
            await asyncio.sleep(_WAIT_INTERVAL)

    # -- launching ----------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        self.settings.token()  # no token: fail now, saying where it is looked for
        kwargs.pop("extra_arguments", None)
        # The command is the gateway's to choose (its kernelspec); the manager wants one.
        kwargs["cmd"] = list(self.kernel_spec.argv) if self.kernel_spec else []
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        timeout = self.settings.launch_timeout
        attempt = object()
        self._launch_attempt = attempt
        launch = asyncio.ensure_future(self._launch(kwargs.get("env") or {}, attempt))
        done, _ = await asyncio.wait({launch}, timeout=timeout)
        if not done:
            # The gateway goes on starting it: abandoned, it is shut down once it is up, not
            # left running unseen (see ``_shut_down_when_started``).
            self._launch_attempt = None
            cleanup = asyncio.ensure_future(self._shut_down_when_started(launch))
            self._abandoned.add(cleanup)
            cleanup.add_done_callback(self._abandoned.discard)
            raise TimeoutError(
                f"the nbcluster kernel did not start within launch_timeout={timeout:g} s "
                f"(gateway {self.settings.gateway_url}, kernelspec "
                f"{self.settings.kernel_name!r}): the cluster may have no host with room for "
                "it; see `nbcluster status`, or raise launch_timeout in the kernelspec"
            )
        _, connection = launch.result()
        self.connection_info = connection
        self._exit_code = None
        self._shutdown_asked = False
        return connection

    async def _launch(
        self, env: dict[str, str], attempt: object
    ) -> tuple[str | None, KernelConnectionInfo]:
        """Start (or restart) the gateway's kernel and fetch its face's connection info.
        Returns the id of a kernel it started (None for a restart) with the info."""
        api = self._api()
        started: str | None = None
        if self.gateway_kernel_id is not None and self._restarting:
            kernel_id = self.gateway_kernel_id
            await api.restart(kernel_id)
            self._restarting = False
        else:
            kernel_env = {k: v for k, v in env.items() if k.startswith("KERNEL_")}
            kernel_env.update(self.settings.kernel_env())
            kernel = await api.start_kernel(self.settings.kernel_name, kernel_env)
            kernel_id = started = kernel.id
            if self._launch_attempt is attempt:
                self.gateway_kernel_id = kernel.id
            log.info(
                "kernel %s runs on nbcluster as %s (%s)",
                self.kernel_id,
                kernel.id,
                self.settings.gateway_url,
            )
        return started, _manager_info(await api.connection(kernel_id))

    async def _shut_down_when_started(
        self, launch: asyncio.Future[tuple[str | None, KernelConnectionInfo]]
    ) -> None:
        """A start abandoned at ``launch_timeout``: once the gateway answers it, shut down the
        kernel it made (the Jupyter server has already told the user the start failed). A
        restart that timed out keeps its kernel: the provisioner still holds its id."""
        try:
            started, _ = await launch
        except Exception as exc:
            log.info("the abandoned nbcluster kernel start failed too: %s", exc)
            return
        if started is None:
            return
        log.warning(
            "nbcluster kernel %s started after launch_timeout=%g s; shutting it down",
            started,
            self.settings.launch_timeout,
        )
        try:
            await self._api().shutdown(started)
        except (GatewayCallError, httpx.HTTPError) as exc:
            log.warning("could not shut down nbcluster kernel %s: %s", started, exc)

    # -- signals and ending -------------------------------------------------------------------

    async def send_signal(self, signum: int) -> None:
        if self.gateway_kernel_id is None or signum == 0:
            return
        if signum == signal.SIGINT:
            await self._api().interrupt(self.gateway_kernel_id)
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            await self._end(restart=False, code=-signum)
        else:
            log.warning(
                "nbcluster kernel %s: signal %d is not forwarded (SIGINT interrupts, SIGTERM "
                "and SIGKILL shut down)",
                self.gateway_kernel_id,
                signum,
            )

    async def shutdown_requested(self, restart: bool = False) -> None:
        # The face answered the shutdown_request (and, unless restarting, is shutting the
        # kernel down); a restart is done by launch_kernel.
        self._shutdown_asked = True
        if restart:
            self._restarting = True

    async def terminate(self, restart: bool = False) -> None:
        await self._end(restart, -signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        await self._end(restart, -signal.SIGKILL)

    async def _end(self, restart: bool, code: int) -> None:
        if self.gateway_kernel_id is None:
            return
        if restart:
            self._restarting = True
            return
        self._shutdown_asked = True
        await self._api().shutdown(self.gateway_kernel_id)
        self._exit_code = code

    async def cleanup(self, restart: bool = False) -> None:
        if not restart:
            self.gateway_kernel_id = None
            self.connection_info = {}

    # -- persistence --------------------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        # JSON, for whoever persists it (the manager's copy holds the key as bytes).
        info["connection_info"] = {
            k: v.decode() if isinstance(v, bytes) else v for k, v in self.connection_info.items()
        }
        info["gateway_kernel_id"] = self.gateway_kernel_id
        info["gateway_url"] = self.settings.gateway_url
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        gateway_url = provisioner_info.get("gateway_url")
        if gateway_url is not None and gateway_url != self.settings.gateway_url:
            raise ValueError(
                f"the saved kernel runs on the nbcluster gateway {gateway_url}, but this "
                f"kernelspec now names {self.settings.gateway_url}"
            )
        kernel_id = provisioner_info.get("gateway_kernel_id")
        if not isinstance(kernel_id, str) or not kernel_id:
            raise ValueError("the saved provisioner info has no nbcluster gateway_kernel_id")
        self.gateway_kernel_id = kernel_id
        api = self._api()
        if await api.kernel(kernel_id) is None:
            self._exit_code = _EXIT_LOST
            raise ValueError(f"the nbcluster gateway has no kernel {kernel_id} any more")
        # The face may have been reopened (new ports and keys) after a gateway restart.
        connection = await api.connection(kernel_id)
        self.connection_info = _manager_info(connection)
        self._exit_code = None

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.settings.launch_timeout)


def _manager_info(connection: KernelConnection) -> KernelConnectionInfo:
    """Connection info as a ``KernelManager`` holds it: the HMAC key as bytes (it compares
    what a provisioner returns with its own, where the key is the session's bytes)."""
    info = connection.connection_file()
    info["key"] = connection.key.encode()
    return cast(KernelConnectionInfo, info)
