"""The kernel replica process: :class:`ReplicaKernel` and the app that launches it."""

from ._app import ReplicaKernelApp, main
from ._kernel import ReplicaKernel

__all__ = ["ReplicaKernel", "ReplicaKernelApp", "main"]
