"""The gateway (global scheduler): the Jupyter Kernel Gateway API over a cluster of hosts."""

from ._app import Gateway
from ._asgi import create_app
from ._config import GatewayConfig, HostProviderConfig
from ._container_hosts import HostTemplate, parse_mount
from ._docker_provider import DockerHostProvider
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
from ._face_rules import PortRange, parse_port_range
from ._host_providers import make_host_provider
from ._hosts import HostEntry, HostRegistry, HostSession
from ._identity import GatewayIdentity, join_token_path
from ._kernel import GatewayKernel, error_replies
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpec, KernelSpecError, KernelSpecRegistry
from ._manager import KernelManager, validate_env
from ._provider import HostProvider, LocalProcessHostProvider, MachineHostProvider
from ._routing import PendingRequest, PendingRequests
from ._server import run, serve
from ._ssh_command import parse_machines as parse_ssh_machines
from ._ssh_command import validate_user as validate_ssh_user
from ._state import FileStateStore, KernelRecord, MemoryStateStore, ReplicaRecord, StateStore
from ._swarm_provider import SwarmHostProvider

__all__ = [
    "DEFAULT_KERNEL_NAME",
    "ApiError",
    "CheckpointError",
    "DockerHostProvider",
    "FileStateStore",
    "Gateway",
    "GatewayConfig",
    "GatewayIdentity",
    "GatewayKernel",
    "HostEntry",
    "HostMessageTooLarge",
    "HostProvider",
    "HostProviderConfig",
    "HostProviderError",
    "HostRefused",
    "HostRegistry",
    "HostRequestError",
    "HostSession",
    "HostTemplate",
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
    "MachineHostProvider",
    "MemoryStateStore",
    "MigrationError",
    "NbclusterError",
    "NoSuchJob",
    "NoSuchKernel",
    "PendingRequest",
    "PendingRequests",
    "PortRange",
    "ReplicaRecord",
    "RequestTimedOut",
    "RequestTooLarge",
    "StateStore",
    "SwarmHostProvider",
    "create_app",
    "error_replies",
    "join_token_path",
    "make_host_provider",
    "parse_mount",
    "parse_port_range",
    "parse_ssh_machines",
    "run",
    "serve",
    "validate_env",
    "validate_ssh_user",
]
