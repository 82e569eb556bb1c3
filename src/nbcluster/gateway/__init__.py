"""The gateway (global scheduler): the Jupyter Kernel Gateway API over a cluster of hosts."""

from ._app import Gateway
from ._asgi import create_app
from ._config import GatewayConfig
from ._errors import (
    ApiError,
    CheckpointError,
    HostMessageTooLarge,
    HostProviderError,
    HostRefused,
    HostRequestError,
    HostTimedOut,
    HostUnreachable,
    JobError,
    KernelRejected,
    KernelRequestError,
    KernelStartError,
    KernelUnavailable,
    MigrationError,
    NbclusterError,
    NoSuchJob,
    NoSuchKernel,
    RequestTimedOut,
    RequestTooLarge,
)
from ._hosts import HostEntry, HostRegistry, HostSession
from ._identity import GatewayIdentity, join_token_path
from ._kernel import GatewayKernel, error_replies
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpec, KernelSpecError, KernelSpecRegistry
from ._manager import KernelManager, validate_env
from ._provider import HostProvider, LocalProcessHostProvider
from ._routing import PendingRequest, PendingRequests
from ._server import run, serve
from ._state import FileStateStore, KernelRecord, MemoryStateStore, ReplicaRecord, StateStore

__all__ = [
    "DEFAULT_KERNEL_NAME",
    "ApiError",
    "CheckpointError",
    "FileStateStore",
    "Gateway",
    "GatewayConfig",
    "GatewayIdentity",
    "GatewayKernel",
    "HostEntry",
    "HostMessageTooLarge",
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
    "KernelRejected",
    "KernelRequestError",
    "KernelSpec",
    "KernelSpecError",
    "KernelSpecRegistry",
    "KernelStartError",
    "KernelUnavailable",
    "LocalProcessHostProvider",
    "MemoryStateStore",
    "MigrationError",
    "NbclusterError",
    "NoSuchJob",
    "NoSuchKernel",
    "PendingRequest",
    "PendingRequests",
    "ReplicaRecord",
    "RequestTimedOut",
    "RequestTooLarge",
    "StateStore",
    "create_app",
    "error_replies",
    "join_token_path",
    "run",
    "serve",
    "validate_env",
]
