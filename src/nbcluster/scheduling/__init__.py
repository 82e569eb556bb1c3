"""Scheduling decisions as pure code: events and snapshots in, decisions out, no I/O.

:class:`Scheduler` is the GPU-aware core (resource accounting, oversubscription, placement,
binding, migration) that the gateway drives with events, and :func:`scaling_decision` the
auto-scaler's rule.
"""

from ._actions import (
    Action,
    BindGpus,
    CancelWait,
    Migrate,
    MigrationRefused,
    PlaceReplicas,
    RejectKernel,
    ReleaseGpus,
    ScaleIn,
    ScaleOut,
    WaitForGpus,
)
from ._events import (
    Event,
    ExecutionCancelled,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    HostResourcesChanged,
    KernelAdopted,
    KernelRequested,
    KernelStopped,
    MigrationRequested,
    ReplicaAdopted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStopped,
)
from ._policies import BATCH, NOTEBOOKOS, POLICIES, RESERVATION, Policy, policy_named
from ._resources import DEFAULT_REQUEST, Resources, parse_request
from ._scaling import ScalingConfig, scaling_decision
from ._state import Scheduler, SchedulerConfig
from ._views import Binding, ClusterSummary, HostView, KernelView

__all__ = [
    "BATCH",
    "DEFAULT_REQUEST",
    "NOTEBOOKOS",
    "POLICIES",
    "RESERVATION",
    "Action",
    "BindGpus",
    "Binding",
    "CancelWait",
    "ClusterSummary",
    "Event",
    "ExecutionCancelled",
    "ExecutionFinished",
    "ExecutionRequested",
    "HostAdded",
    "HostRemoved",
    "HostResourcesChanged",
    "HostView",
    "KernelAdopted",
    "KernelRequested",
    "KernelStopped",
    "KernelView",
    "Migrate",
    "MigrationRefused",
    "MigrationRequested",
    "PlaceReplicas",
    "Policy",
    "RejectKernel",
    "ReleaseGpus",
    "ReplicaAdopted",
    "ReplicaReady",
    "ReplicaRequested",
    "ReplicaStopped",
    "Resources",
    "ScaleIn",
    "ScaleOut",
    "ScalingConfig",
    "Scheduler",
    "SchedulerConfig",
    "WaitForGpus",
    "parse_request",
    "policy_named",
    "scaling_decision",
]
