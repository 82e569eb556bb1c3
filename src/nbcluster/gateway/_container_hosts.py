"""What the container host providers (``_docker_provider``, ``_swarm_provider``) share: the
labels they find their hosts by, the command a host daemon container runs, the gateway's
provider id, mounts, the Docker SDK, and their base class (:class:`ContainerHostProvider`: the
bookkeeping of the hosts one provider started).

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

import asyncio
import contextlib
import importlib
import logging
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar
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
    "ContainerHostProvider",
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


class _Host(Protocol):
    """What a container provider keeps about each host it started."""

    @property
    def live(self) -> bool:
        """Whether the host runs or is about to (it counts as started)."""
        ...


H = TypeVar("H", bound=_Host)


class ContainerHostProvider(ABC, Generic[H]):
    """What the ``docker`` and ``swarm`` host providers share: the template and join token
    checked, the Docker client, the hosts started (``_hosts``: name → what the provider keeps
    of it, ``H``), the next host number, adopting a previous run's hosts, stopping them and
    closing. A subclass sets ``name`` and the words its logs use, and finds its hosts
    (``_discover``), starts (``_start``) and stops (``_stop``) them."""

    name: str
    #: What one host is, in logs ("host container").
    _kind: ClassVar[str]
    #: What stopping one is, in logs ("stop").
    _stop_verb: ClassVar[str]
    #: The subclass's module's logger.
    _log: ClassVar[logging.Logger]

    def __init__(
        self,
        template: HostTemplate,
        join_token: str,
        client: Any = None,
        stop_grace: float = 10.0,
    ) -> None:
        if template.provider != self.name:
            raise ValueError(
                f"a {self.name} provider needs a {self.name} template, not {template.provider}"
            )
        if not join_token:
            raise ValueError("the join token must not be empty")
        self._check(template)
        self.template = template
        self.settings = template.settings
        self.stop_grace = stop_grace
        self._join_token = join_token
        self._client = client
        self._hosts: dict[str, H] = {}
        self._next = 1
        self._discovered = False
        self._lock = asyncio.Lock()
        self._closed = False

    def _check(self, template: HostTemplate) -> None:
        """Raise ValueError for a template of this provider that it cannot run."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image={self.settings.image!r}, "
            f"gateway={self.template.gateway_id!r}, hosts={sorted(self._hosts)!r})"
        )

    def client(self) -> Any:
        if self._client is None:
            self._client = docker_call("connect to the Docker engine", docker_module().from_env)
        return self._client

    # -- finding what a previous run started ----------------------------------------------------

    async def discover(self) -> list[str]:
        """Adopt this gateway's hosts already on the engine or in the swarm (a restart), and
        learn their states anew (the gateway calls it every scaling interval); returns their
        names."""
        async with self._lock:
            await self._discover()
            return sorted(self._hosts)

    @abstractmethod
    async def _discover(self) -> None:
        """Find this gateway's hosts and :meth:`_adopt` them (under the lock)."""

    def _adopt(self, found: dict[str, H]) -> None:
        """Take ``found`` as the hosts there are now (a host removed by hand no longer counts
        as started), numbering the next host after theirs."""
        for name in found:
            number = host_number(name, self.settings.name_prefix)
            if number is not None:
                self._next = max(self._next, number + 1)
        if not self._discovered and found:
            self._log.info("adopted %ss %s", self._kind, ", ".join(sorted(found)))
        self._hosts = found
        self._discovered = True

    # -- HostProvider ---------------------------------------------------------------------------

    async def start_hosts(self, count: int) -> list[str]:
        if count < 0:
            raise HostProviderError(f"cannot start {count} hosts")
        if self._closed:
            raise HostProviderError(f"the {self.name} host provider is closed")
        async with self._lock:
            if not self._discovered:
                await self._discover()
            return await self._start(count)

    @abstractmethod
    async def _start(self, count: int) -> list[str]:
        """Start up to ``count`` hosts (under the lock, the hosts discovered)."""

    async def stop_host(self, name: str) -> None:
        """Stop the host ``name`` (SIGTERM, a kill after ``stop_grace``) and remove what ran
        it. One already gone is forgotten; a name it never started raises."""
        if name not in self._hosts:
            raise HostProviderError(
                f"host {name!r} was not started by the {self.name} host provider of gateway "
                f"{self.template.gateway_id}"
            )
        await self._stop(name, self._hosts[name])
        del self._hosts[name]

    @abstractmethod
    async def _stop(self, name: str, host: H) -> None:
        """Stop and remove the host ``name``; one already gone is no error."""

    def owns(self, name: str) -> bool:
        return name in self._hosts

    def started(self) -> list[str]:
        return sorted(n for n, h in self._hosts.items() if h.live)

    async def close(self) -> None:
        """With ``stop_on_exit``, stop every host; else leave them for the next gateway
        (their daemons reconnect to it)."""
        self._closed = True
        if self.settings.stop_on_exit:
            for name in list(self._hosts):
                try:
                    await self.stop_host(name)
                except HostProviderError as exc:
                    self._log.error(
                        "could not %s %s %s: %s", self._stop_verb, self._kind, name, exc
                    )
        elif self._hosts:
            self._log.info(
                "%ss %s keep running for the next gateway",
                self._kind,
                ", ".join(sorted(self._hosts)),
            )
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._client.close)
