"""The gateway (global scheduler): the Jupyter Kernel Gateway API over a cluster of hosts."""

from ._app import Gateway
from ._asgi import create_app
from ._config import GatewayConfig
from ._errors import (
    ApiError,
    HostProviderError,
    HostRefused,
    HostRequestError,
    HostTimedOut,
    HostUnreachable,
    JobError,
    NbclusterError,
    NoSuchJob,
)
from ._hosts import HostEntry, HostRegistry, HostSession
from ._kernel import GatewayKernel, KernelUnavailable, error_replies
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpec, KernelSpecError, KernelSpecRegistry
from ._manager import (
    KernelManager,
    KernelRequestError,
    KernelStartError,
    NoSuchKernel,
    validate_env,
)
from ._provider import HostProvider, LocalProcessHostProvider
from ._routing import PendingRequest, PendingRequests
from ._server import run, serve
from ._state import FileStateStore, KernelRecord, MemoryStateStore, ReplicaRecord, StateStore

__all__ = [
    "DEFAULT_KERNEL_NAME",
    "ApiError",
    "FileStateStore",
    "Gateway",
    "GatewayConfig",
    "GatewayKernel",
    "HostEntry",
    "HostProvider",
    "HostProviderError",
    "HostRefused",
    "HostRegistry",
    "HostRequestError",
    "HostSession",
    "HostTimedOut",
    "HostUnreachable",
    "JobError",
    "KernelManager",
    "KernelRecord",
    "KernelRequestError",
    "KernelSpec",
    "KernelSpecError",
    "KernelSpecRegistry",
    "KernelStartError",
    "KernelUnavailable",
    "LocalProcessHostProvider",
    "MemoryStateStore",
    "NbclusterError",
    "NoSuchJob",
    "NoSuchKernel",
    "PendingRequest",
    "PendingRequests",
    "ReplicaRecord",
    "StateStore",
    "create_app",
    "error_replies",
    "run",
    "serve",
    "validate_env",
]
