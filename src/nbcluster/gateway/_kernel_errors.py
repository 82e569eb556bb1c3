"""Why a request about a kernel failed: raised by the kernel manager's modules, turned into
HTTP statuses by the REST API (``_app``)."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "KernelRejected",
    "KernelRequestError",
    "KernelStartError",
    "MigrationError",
    "NoSuchKernel",
]


class NoSuchKernel(LookupError):
    """No kernel has that id (404)."""


class KernelRequestError(ValueError):
    """The request names an unknown kernelspec or carries bad values (400)."""


class KernelStartError(RuntimeError):
    """The kernel could not be started (no host, a replica failed ...); the text says why."""


class KernelRejected(KernelStartError):
    """The scheduler refused the kernel. ``permanent``: no host could ever take it (400);
    otherwise the cluster is full now (503)."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class MigrationError(RuntimeError):
    """A requested migration was refused or failed; the text says why."""


class CheckpointError(RuntimeError):
    """A requested checkpoint could not be written; the text says why."""
