"""Scheduling decisions as pure code: events and snapshots in, decisions out, no I/O.

``choose_hosts`` is today's least-loaded placement used by the gateway; :class:`Scheduler`
is the GPU-aware core (resource accounting, oversubscription, binding, migration) that the
gateway will drive with events, and :func:`scaling_decision` its auto-scaler.
"""

from ._actions import (
    Action,
    BindGpus,
    CancelWait,
    Migrate,
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
    KernelRequested,
    KernelStopped,
    ReplicaRequested,
    ReplicaStopped,
)
from ._placement import HostLoad, PlacementError, choose_hosts
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
    "HostLoad",
    "HostRemoved",
    "HostResourcesChanged",
    "HostView",
    "KernelRequested",
    "KernelStopped",
    "KernelView",
    "Migrate",
    "PlaceReplicas",
    "PlacementError",
    "Policy",
    "RejectKernel",
    "ReleaseGpus",
    "ReplicaRequested",
    "ReplicaStopped",
    "Resources",
    "ScaleIn",
    "ScaleOut",
    "ScalingConfig",
    "Scheduler",
    "SchedulerConfig",
    "WaitForGpus",
    "choose_hosts",
    "parse_request",
    "policy_named",
    "scaling_decision",
]
