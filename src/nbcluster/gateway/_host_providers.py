"""Which host provider the gateway's auto-scaler gets (``nbcluster gateway --hosts-from``):
``local`` (``_provider.LocalProcessHostProvider``), ``docker`` (``_docker_provider``),
``swarm`` (``_swarm_provider``), ``kubernetes`` (``_kubernetes_provider``) or ``ssh``
(``_ssh_provider``). Every one is told the gateway's advertised URL
(``GatewayConfig.advertised_url``: ``--public-url``, else the listening address)."""

from __future__ import annotations

import asyncio
import logging

from ._config import GatewayConfig
from ._container_hosts import HostTemplate, file_store_dir, provider_id
from ._docker_provider import DockerHostProvider
from ._errors import HostProviderError
from ._kubernetes_provider import KubernetesHostProvider
from ._provider import HostProvider, LocalProcessHostProvider
from ._ssh_provider import SshHostProvider
from ._swarm_provider import SwarmHostProvider

__all__ = ["HOST_PROVIDERS", "adopt_hosts", "make_host_provider", "watch_hosts"]

log = logging.getLogger(__name__)

HOST_PROVIDERS = ("local", "docker", "swarm", "kubernetes", "ssh")


def make_host_provider(
    config: GatewayConfig,
    join_token: str,
    log_level: str,
    kernelspec_machines: tuple[str, ...] = (),
) -> HostProvider:
    """The provider ``--hosts-from`` names. ``kernelspec_machines``: every machine the
    kernelspecs' ``remote_hosts`` name, which only the ``ssh`` provider can start daemons on
    (others log that those kernelspecs' kernels will be refused)."""
    settings = config.host_provider
    if kernelspec_machines and settings.kind != "ssh":
        log.error(
            "kernelspecs name remote_hosts (%s) but hosts come from %s: their kernels will be "
            "refused (remote_hosts need --hosts-from ssh)",
            ", ".join(kernelspec_machines),
            settings.kind,
        )
    if settings.kind == "local":
        return LocalProcessHostProvider(
            gateway_url=config.advertised_url,
            join_token=join_token,
            state_dir=config.state_dir.parent,
            gpus_per_host=config.scaling_gpus_per_host,
            log_level=log_level,
            name_prefix=settings.name_prefix,
        )
    if settings.kind not in HOST_PROVIDERS:
        raise ValueError(f"unknown host provider {settings.kind!r} (one of {HOST_PROVIDERS})")
    if settings.kind == "ssh":
        if not config.public_url:
            log.warning(
                "ssh hosts are told the gateway is at %s; machines need --public-url with an "
                "address they can reach",
                config.advertised_url,
            )
        return SshHostProvider(
            settings.ssh_hosts,
            config.advertised_url,
            join_token,
            kernelspec_machines=kernelspec_machines,
            nbcluster=settings.ssh_nbcluster,
            user=settings.ssh_user,
            known_hosts=settings.ssh_known_hosts,
            accept_unknown_hosts=settings.ssh_accept_unknown_hosts,
            client_keys=settings.ssh_keys,
            ssh_config=settings.ssh_config,
            gpus_per_host=None if settings.gpus == "nvidia" else config.scaling_gpus_per_host,
            ca=settings.ssh_ca,
            state_dir=settings.ssh_state_dir,
            host_args=settings.ssh_host_args,
            log_level=log_level,
        )
    if settings.kind == "kubernetes":
        # The join token and CA reach host pods from the Secret and the pod template.
        return KubernetesHostProvider(
            gateway_url=config.advertised_url,
            gateway_id=provider_id(config.state_dir),
            gpus_per_host=config.scaling_gpus_per_host,
            pod_template=settings.pod_template,
            namespace=settings.namespace,
            name_prefix=settings.name_prefix,
            log_level=log_level,
            stop_on_exit=settings.stop_on_exit,
        )
    template = HostTemplate(
        provider=settings.kind,
        gateway_id=provider_id(config.state_dir),
        gateway_url=config.advertised_url,
        settings=settings,
        gpus_per_host=config.scaling_gpus_per_host,
        log_level=log_level,
        store_dir=file_store_dir(config.store_url or config.store_dir.as_uri()),
    )
    if settings.kind == "swarm" and not config.public_url:
        log.warning(
            "swarm hosts are told the gateway is at %s; hosts on other nodes need "
            "--public-url with an address they can reach",
            config.advertised_url,
        )
    if settings.kind == "docker":
        return DockerHostProvider(template, join_token)
    return SwarmHostProvider(template, join_token)


async def watch_hosts(provider: HostProvider, interval: float) -> None:
    """Keep a container provider's idea of its hosts true (one that was removed by hand, or
    whose node went down, no longer counts as started): ask the engine every ``interval``
    seconds, until cancelled."""
    if not isinstance(provider, DockerHostProvider | SwarmHostProvider):
        return
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            await provider.discover()
        except HostProviderError as exc:
            if not failing:
                log.warning("cannot look at the %s hosts: %s", provider.name, exc)
            failing = True
        else:
            failing = False


async def adopt_hosts(provider: HostProvider) -> None:
    """Let a container provider find the hosts a previous gateway started (by their labels)
    before the first scaling round; an engine that does not answer now is asked again at the
    first scale-out."""
    if isinstance(provider, DockerHostProvider | SwarmHostProvider | KubernetesHostProvider):
        try:
            names = await provider.discover()
        except HostProviderError as exc:
            log.error("could not look for earlier %s hosts: %s", provider.name, exc)
            return
        if names:
            log.info("%s hosts from an earlier run: %s", provider.name, ", ".join(names))
