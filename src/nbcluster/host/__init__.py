"""The host daemon (local scheduler): runs kernel replicas on one machine for the gateway."""

from ._config import HostConfig
from ._daemon import HostDaemon, HostRejected
from ._processes import ReplicaProcess, ReplicaStartError, ReplicaSupervisor
from ._resources import discover_nvml_gpus, discover_resources, virtual_gpus

__all__ = [
    "HostConfig",
    "HostDaemon",
    "HostRejected",
    "ReplicaProcess",
    "ReplicaStartError",
    "ReplicaSupervisor",
    "discover_nvml_gpus",
    "discover_resources",
    "virtual_gpus",
]
