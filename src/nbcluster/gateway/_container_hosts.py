"""What the container host providers (``_docker_provider``, ``_swarm_provider``) share: the
labels they find their hosts by, the command a host daemon container runs, the gateway's
provider id, mounts, and the Docker SDK.

A host daemon container runs the image's entry point (``nbcluster``) with ``host --gateway
URL --name NAME --log-level L [--gpus N] [--ca /etc/nbcluster/ca.pem] --address ADDR``. No
secret is on that command line: the join token reaches the daemon through its environment
(``docker``, set through the engine's API) or a Docker secret file (``swarm``). The admin
token is never given to hosts.

``--address`` is where the daemon's replicas listen, and the address the gateway connects to:
with host networking the address of the machine (node) it runs on; on any other network the
container's own address, which is only known inside the container, so there the container
runs ``/bin/sh -c`` with a fixed script that appends ``--address "$(hostname -i)"`` (the
arguments stay separate words, ``"$@"``; nothing is interpolated into the script).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ._config import HostProviderConfig
from ._errors import HostProviderError

__all__ = [
    "CA_PATH",
    "LABEL_GATEWAY",
    "LABEL_GPUS",
    "LABEL_HOST",
    "LABEL_PROVIDER",
    "LABEL_ROLE",
    "HostTemplate",
    "Mount",
    "docker_call",
    "docker_module",
    "file_store_dir",
    "host_number",
    "parse_mount",
    "provider_id",
]

log = logging.getLogger(__name__)

LABEL_PROVIDER = "nbcluster.provider"
LABEL_GATEWAY = "nbcluster.gateway"
LABEL_HOST = "nbcluster.host"
#: ``host`` on host daemon containers (replica containers say ``replica``).
LABEL_ROLE = "nbcluster.role"
#: ``docker`` with real GPUs: the engine's device indices a host container was given.
LABEL_GPUS = "nbcluster.gpus"

#: Where a host container finds the CA it verifies an https gateway with.
CA_PATH = "/etc/nbcluster/ca.pem"

#: The script of a host container on a network other than the host's (module docstring).
ADDRESS_SCRIPT = 'exec nbcluster "$@" --address "$(hostname -i | cut -d " " -f 1)"'

T = TypeVar("T")


def docker_module() -> Any:
    """The ``docker`` SDK, imported on first use (``Any``: it is untyped)."""
    return importlib.import_module("docker")


def docker_call(what: str, call: Callable[[], T]) -> T:
    """``call()`` (blocking: run it in a thread), with the engine's errors turned into a
    :class:`HostProviderError` naming ``what`` was being done."""
    errors = docker_module().errors
    try:
        return call()
    except errors.DockerException as exc:
        raise HostProviderError(f"{what}: {exc}") from exc
    except OSError as exc:  # the engine's socket
        raise HostProviderError(f"{what}: cannot reach the Docker engine: {exc}") from exc


def provider_id(state_dir: Path) -> str:
    """This gateway's id in its hosts' ``nbcluster.gateway`` label: kept in
    ``state_dir/gateway-id`` (made at the first start), so that a restarted gateway finds the
    containers and services it started. Not a secret."""
    path = state_dir / "gateway-id"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if re.fullmatch(r"[a-z0-9]{4,32}", text):
        return text
    if text:
        raise HostProviderError(f"{path} holds {text!r}, not a gateway id (4-32 of a-z, 0-9)")
    text = secrets.token_hex(6)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return text


def host_number(name: str, prefix: str) -> int | None:
    """``n`` of a host called ``<prefix>-<n>``; None for any other name."""
    head, _, tail = name.rpartition("-")
    return int(tail) if head == prefix and tail.isdigit() else None


def file_store_dir(store_url: str) -> Path | None:
    """The directory of a ``file://`` object store (mounted into host containers at the same
    path, so the URL the gateway gives replicas works there); None for other stores."""
    parts = urlsplit(store_url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parts.path))


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    @property
    def type(self) -> str:
        """``bind`` for a path, ``volume`` for a volume's name."""
        return "bind" if self.source.startswith("/") else "volume"


def parse_mount(spec: str) -> Mount:
    """``SOURCE:TARGET[:ro|rw]``: a host path (absolute) or a volume name, and where it goes
    in the container (absolute)."""
    parts = spec.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or mode not in ("ro", "rw") or not all(parts):
        raise ValueError(f"mount {spec!r} is not SOURCE:TARGET[:ro|rw]")
    source, target = parts
    if not target.startswith("/"):
        raise ValueError(f"mount {spec!r}: the target {target!r} is not an absolute path")
    return Mount(source, target, read_only=mode == "ro")


@dataclass(frozen=True)
class HostTemplate:
    """What every host container of one provider runs (see the module docstring)."""

    provider: str
    gateway_id: str
    gateway_url: str
    settings: HostProviderConfig
    gpus_per_host: int
    log_level: str = "info"
    #: A ``file://`` object store's directory, mounted at the same path.
    store_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL {self.gateway_url!r} is not http(s)")
        if self.gpus_per_host < 0:
            raise ValueError(f"gpus_per_host must be 0 or more, not {self.gpus_per_host}")
        if self.settings.gpus not in ("virtual", "nvidia"):
            raise ValueError(f"host GPUs are 'virtual' or 'nvidia', not {self.settings.gpus!r}")
        if self.settings.gpus == "nvidia" and self.gpus_per_host < 1:
            raise ValueError("hosts with real GPUs need at least 1 GPU per host")
        for spec in self.settings.mounts:
            parse_mount(spec)

    @property
    def host_network(self) -> bool:
        return self.settings.network == "host"

    def labels(self, name: str) -> dict[str, str]:
        return {
            LABEL_PROVIDER: self.provider,
            LABEL_GATEWAY: self.gateway_id,
            LABEL_HOST: name,
            LABEL_ROLE: "host",
        }

    def filters(self) -> dict[str, list[str]]:
        """The engine's filter for this gateway's hosts of this provider."""
        return {
            "label": [f"{LABEL_PROVIDER}={self.provider}", f"{LABEL_GATEWAY}={self.gateway_id}"]
        }

    def resource_name(self, name: str) -> str:
        """The container's (or service's) name for the host ``name``: unique per gateway."""
        return f"nbcluster-{self.gateway_id}-{name}"

    def args(self, name: str, address: str | None) -> list[str]:
        """The arguments after the image's ``nbcluster`` entry point. ``address`` None: the
        container's own (see :meth:`entrypoint`)."""
        args = ["host", "--gateway", self.gateway_url, "--name", name]
        args += ["--log-level", self.log_level]
        if self.settings.gpus == "virtual":
            args += ["--gpus", str(self.gpus_per_host)]
        if self.settings.ca is not None:
            args += ["--ca", CA_PATH]
        if address is not None:
            args += ["--address", address]
        return args

    def entrypoint(self, address: str | None) -> list[str] | None:
        """None: the image's own; with no fixed address, the script that appends the
        container's."""
        return None if address is not None else ["/bin/sh", "-c", ADDRESS_SCRIPT, "nbcluster-host"]

    def mounts(self, ca: bool = True) -> list[Mount]:
        """The mounts of a host container; ``ca``: the CA file too (``swarm`` gives it as a
        Docker config instead: a bind mount needs the file on every node)."""
        found = [parse_mount(spec) for spec in self.settings.mounts]
        if self.store_dir is not None and not any(m.target == str(self.store_dir) for m in found):
            found.append(Mount(str(self.store_dir), str(self.store_dir)))
        if ca and self.settings.ca is not None:
            found.append(Mount(str(self.settings.ca.resolve()), CA_PATH, read_only=True))
        return found
