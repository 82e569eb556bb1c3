"""How the gateway names things to the scheduler, pure: a host's spec and ``HostAdded`` from
what its daemon reported, and the ids of new replicas.

The scheduler driver (``_driver``) gives :func:`new_replica_id` to the scheduler's config;
the auto-scaler and the host reconciliation (``_autoscaler``, ``_reconcile``) turn a host's
hello into :func:`host_added` (which uses :func:`host_spec`). All three are imported from
``_driver``, where they were first.
"""

from __future__ import annotations

import secrets

from ..hostproto import HostResources
from ..scheduling import HostAdded, Resources

__all__ = ["host_added", "host_spec", "new_replica_id"]


def new_replica_id(kernel_id: str, number: int) -> str:
    """Replica ids unique across kernel restarts and gateway restarts (host daemons and log
    files are keyed by them)."""
    return f"{kernel_id[:8]}-{secrets.token_hex(3)}"


def host_spec(resources: HostResources) -> tuple[Resources, tuple[int, ...]]:
    """What the scheduler knows of a host, from what its daemon reported."""
    spec = Resources(
        gpus=len(resources.gpus),
        millicpus=resources.cpus * 1000,
        memory_mb=resources.memory_mb,
        vram_gb=round(sum(g.memory_mb for g in resources.gpus) / 1024, 3),
    )
    return spec, tuple(g.index for g in resources.gpus)


def host_added(name: str, resources: HostResources) -> HostAdded:
    """The scheduler's event for a host's hello, with each GPU's memory in bytes."""
    spec, devices = host_spec(resources)
    return HostAdded(
        name, spec, devices, tuple(g.memory_mb << 20 for g in resources.gpus), resources.pool
    )
