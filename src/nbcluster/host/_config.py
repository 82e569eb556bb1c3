"""Settings of one host daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HostConfig"]


@dataclass(frozen=True)
class HostConfig:
    """What ``nbcluster host`` is started with.

    ``address`` is where this host's replicas listen and must be reachable from the gateway;
    it is loopback by default.
    """

    gateway_url: str
    token: str
    name: str
    address: str = "127.0.0.1"
    state_dir: Path = field(default_factory=lambda: Path.cwd() / ".nbcluster" / "host")
    working_dir: Path = field(default_factory=Path.cwd)
    virtual_gpus: int | None = None
    default_virtual_gpus: int = 8
    gpu_devices: tuple[int, ...] | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    reconnect_max_delay: float = 5.0
    #: CA certificates (PEM) the gateway's TLS certificate is verified against; None: the
    #: system's trust store. Used only with an https gateway URL.
    ca: Path | None = None
    #: Runs the replicas of kernelspecs that name an image: "docker" (the engine at
    #: DOCKER_HOST or the local socket), "kubernetes" (pods beside the daemon's own pod:
    #: docs/kubernetes.md, "Kernel images as pods"); None: such replicas are refused here.
    container_runtime: str | None = None
    #: ``uid:gid`` replica containers run as (default: the daemon's own, or 1000:1000 when
    #: the daemon is root: never root in the container; with kubernetes, 1000:1000).
    container_user: str | None = None
    #: The host pool it is in (reported in its hello); None: in none.
    pool: str | None = None
