"""The options of ``nbcluster gateway`` that say where its auto-scaler's hosts come from
(``--hosts-from``, the ``--host-*`` and ``--ssh-*`` options, ``--public-url``), and their
checks, which turn them into a :class:`~nbcluster.gateway.HostProviderConfig`.

Called by ``_daemons.gateway_command`` (the options, as one decorator) and by its body (the
checks); ``parse_devices`` serves ``nbcluster host --gpu-devices`` too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from ..gateway import HostProviderConfig

__all__ = [
    "host_provider_config",
    "host_provider_options",
    "parse_devices",
    "refuse_foreign_host_options",
    "ssh_machines",
]

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.option(
        "--hosts-from",
        default="local",
        show_default=True,
        type=click.Choice(["local", "docker", "swarm", "kubernetes", "ssh"]),
        help="What the auto-scaler starts hosts as: local processes, containers on this Docker "
        "engine, Docker Swarm services (one per host), Kubernetes pods (one per host, from "
        "--host-pod-template), or daemons started over ssh on --ssh-hosts machines.",
    ),
    click.option(
        "--public-url",
        metavar="URL",
        help="The gateway's URL as hosts and kernels are told it: one that works where they run "
        "(inside containers, on other nodes). Default: the listening address and port.",
    ),
    click.option(
        "--host-image",
        default="nbcluster:latest",
        show_default=True,
        help="docker/swarm: the image host daemons run (entry point `nbcluster`).",
    ),
    click.option(
        "--host-network",
        default="host",
        show_default=True,
        help="docker/swarm: `host` (the machine's network), or a Docker network to attach hosts to.",
    ),
    click.option(
        "--host-address",
        metavar="ADDR",
        help="docker/swarm with host networking: the hosts' --address (where replicas listen). "
        "Default: 127.0.0.1 (docker), the node's address (swarm).",
    ),
    click.option(
        "--host-gpus",
        default="virtual",
        show_default=True,
        type=click.Choice(["virtual", "nvidia"]),
        help="docker/swarm: virtual GPUs (--scaling-gpus-per-host of them), or real ones: a share "
        "of --host-gpu-devices (docker), NVIDIA-GPU generic resources (swarm).",
    ),
    click.option(
        "--host-gpu-devices",
        metavar="0,1,...",
        help="docker with --host-gpus nvidia: the engine's GPUs to share out among host containers.",
    ),
    click.option(
        "--host-constraint",
        "host_constraints",
        multiple=True,
        metavar="EXPR",
        help="swarm: a placement constraint of host services (repeatable), e.g. "
        "node.labels.nbcluster.gpu==true.",
    ),
    click.option(
        "--hosts-per-node",
        default=1,
        show_default=True,
        type=click.IntRange(1),
        help="swarm: host daemons on one node at most.",
    ),
    click.option(
        "--join-token-secret",
        metavar="NAME",
        help="swarm: the Docker secret holding the join token (default: one made from it).",
    ),
    click.option(
        "--host-user",
        default="1000:1000",
        show_default=True,
        metavar="UID:GID",
        help="swarm: the image's user, owner of the join-token file in host containers.",
    ),
    click.option(
        "--host-mount",
        "host_mounts",
        multiple=True,
        metavar="SOURCE:TARGET[:ro]",
        help="docker/swarm: a path or volume mounted into host containers (repeatable). A file:// "
        "object store is mounted at its own path without it.",
    ),
    click.option(
        "--host-ca",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="docker/swarm: the CA (PEM) host containers verify an https gateway with.",
    ),
    click.option(
        "--host-pod-template",
        default="nbcluster-host",
        show_default=True,
        metavar="NAME",
        help="kubernetes: the PodTemplate host pods are made from (deploy/kubernetes).",
    ),
    click.option(
        "--host-namespace",
        metavar="NS",
        help="kubernetes: the namespace of host pods (default: the gateway pod's own).",
    ),
    click.option(
        "--ssh-hosts",
        "ssh_hosts",
        multiple=True,
        metavar="[USER@]HOST[:PORT][/ADDRESS],...",
        help="ssh: the machines host daemons are started on, one each (repeatable; comma lists "
        "too). ADDRESS: the daemon's --address (default: the address ssh reached).",
    ),
    click.option("--ssh-user", metavar="USER", help="ssh: the login user (default: ssh's)."),
    click.option(
        "--ssh-key",
        "ssh_keys",
        multiple=True,
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="ssh: a private key to log in with (repeatable; default: the agent, ~/.ssh/id_*).",
    ),
    click.option(
        "--ssh-known-hosts",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="ssh: the known_hosts file machines' keys are checked against (default: "
        "~/.ssh/known_hosts). A machine not in it is refused.",
    ),
    click.option(
        "--ssh-accept-unknown-hosts",
        is_flag=True,
        help="ssh: accept (and pin for the gateway's life) the key of a machine known_hosts does "
        "not list. Unsafe on an untrusted network; a changed key is always refused.",
    ),
    click.option(
        "--ssh-config",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="ssh: an ssh_config file to read (default: none).",
    ),
    click.option(
        "--ssh-nbcluster",
        default="nbcluster",
        show_default=True,
        metavar="PATH",
        help="ssh: the `nbcluster` program on the machines.",
    ),
    click.option(
        "--ssh-state-dir", metavar="DIR", help="ssh: the hosts' --state-dir on the machines."
    ),
    click.option(
        "--ssh-ca", metavar="FILE", help="ssh: the hosts' --ca, a path on the machines (https)."
    ),
    click.option(
        "--ssh-host-arg",
        "ssh_host_args",
        multiple=True,
        metavar="ARG",
        help="ssh: one more argument of `nbcluster host` on the machines (repeatable).",
    ),
    click.option(
        "--stop-hosts-on-exit",
        is_flag=True,
        help="docker/swarm: remove the provider's hosts when the gateway stops (by default they "
        "wait for it, and a restarted gateway adopts them).",
    ),
]


def host_provider_options(command: F) -> F:
    """Add every host-provider option to ``command``, in the order of ``--help``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


#: The ``--host-*`` options that only container providers read.
_CONTAINER_HOST_OPTIONS = (
    "host_image",
    "host_network",
    "host_address",
    "host_gpus",
    "host_gpu_devices",
    "host_mounts",
    "host_ca",
    "host_constraints",
    "hosts_per_node",
    "join_token_secret",
    "host_user",
)


def ssh_machines(
    kind: str, specs: tuple[str, ...], user: str | None, kernelspec_dirs: tuple[Path, ...] = ()
) -> tuple[str, ...]:
    """``--ssh-hosts``, checked now (a bad one is named here, not in a traceback later).
    They may be left out when kernelspecs name their own machines (``remote_hosts``)."""
    if kind != "ssh":
        if specs:
            raise click.UsageError("--ssh-hosts goes with --hosts-from ssh")
        return ()
    from ..gateway import KernelSpecRegistry, parse_ssh_machines, validate_ssh_user

    if not specs and not KernelSpecRegistry(kernelspec_dirs).remote_hosts():
        raise click.UsageError(
            "--hosts-from ssh needs --ssh-hosts (the machines to use) or kernelspecs that name "
            "remote_hosts (--kernelspec-dir)"
        )
    try:
        if specs:
            parse_ssh_machines(specs)
        if user is not None:
            validate_ssh_user(user)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ssh-hosts/--ssh-user") from None
    return specs


def refuse_foreign_host_options(kind: str) -> None:
    """A ``--host-*`` option given for a provider that does not read it is a mistake the
    operator should hear about, not a setting silently ignored."""
    if kind not in ("kubernetes", "ssh"):
        return
    context = click.get_current_context()
    for name in _CONTAINER_HOST_OPTIONS:
        if kind == "ssh" and name == "host_gpus":
            continue  # virtual GPUs, or the machines' real ones
        source = context.get_parameter_source(name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            flag = "--" + name.replace("_", "-").replace("host-constraints", "host-constraint")
            flag = flag.replace("host-mounts", "host-mount")
            how = {
                "kubernetes": "the pod template (deploy/kubernetes) says how host pods run",
                "ssh": "the --ssh-* options say how hosts are started",
            }[kind]
            raise click.UsageError(f"{flag} has no meaning with --hosts-from {kind}: {how}")


def host_provider_config(
    kind: str,
    *,
    gpu_devices: str | None,
    mounts: tuple[str, ...],
    ca: Path | None,
    user: str,
    **settings: Any,
) -> HostProviderConfig:
    """``--hosts-from`` and the ``--host-*`` options, checked."""
    from ..gateway import HostProviderConfig, parse_mount

    if not re.fullmatch(r"\d+(:\d+)?", user):
        raise click.BadParameter(f"{user!r} is not UID or UID:GID", param_hint="--host-user")
    for spec in mounts:
        try:
            parse_mount(spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--host-mount") from None
    devices = parse_devices(gpu_devices, "--host-gpu-devices") or ()
    if kind == "docker" and settings["gpus"] == "nvidia" and not devices:
        raise click.UsageError("--hosts-from docker --host-gpus nvidia needs --host-gpu-devices")
    return HostProviderConfig(
        kind=kind,
        gpu_devices=devices,
        mounts=mounts,
        ca=ca.resolve() if ca else None,
        user=user,
        **settings,
    )


def parse_devices(value: str | None, option: str = "--gpu-devices") -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of GPU indices", param_hint=option
        ) from None
