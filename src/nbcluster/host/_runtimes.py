"""What the replica supervisor (``_processes``) drives: a running replica
(:class:`ReplicaHandle`: a process group, a Docker container, a Kubernetes pod) and what runs
the replicas of kernelspecs that name an image (:class:`ContainerRuntime`: ``_containers``'
Docker runtime, ``_kube_replicas``' pods). The daemon (``_daemon``) picks the runtime from
``--container-runtime``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["ContainerRuntime", "ReplicaHandle"]


class ReplicaHandle(Protocol):
    """A running replica, process or container, as the supervisor drives it."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int:
        """Its exit code, once it ended."""
        ...

    def send_signal(self, signum: int) -> None:
        """Deliver a signal to the replica and what its code started."""
        ...

    async def release(self) -> None:
        """After it ended: free what it held (its process group, its container)."""
        ...


class ContainerRuntime(Protocol):
    """What runs the replicas of kernelspecs that name an image: ``_containers``' Docker
    runtime, ``_kube_replicas``' pods. Its replicas are :class:`ReplicaHandle`; one whose
    sockets listen elsewhere than on the host's address (a pod's IP) has it as ``address``."""

    def owner(self) -> tuple[int, int] | None: ...

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
    ) -> ReplicaHandle: ...

    def follow_logs(self, replica: Any, log_path: Path) -> None: ...
