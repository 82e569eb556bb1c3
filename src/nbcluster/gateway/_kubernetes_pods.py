"""The pure part of the ``kubernetes`` host provider (``_kubernetes_provider``): what a host
pod looks like, which nodes can take one and how many GPUs they have left, and what state a
pod of ours is in. Everything here works on the API's JSON shapes (``dict``), never calls the
API server, and raises :class:`HostProviderError` naming what is wrong.

**The pod.** The operator describes host pods once, as a ``v1`` ``PodTemplate``
(``deploy/kubernetes/components/autoscale``): image, node selector, tolerations, runtime
class, security context, volumes, the join token's Secret. :func:`host_pod` copies it and adds
only what differs per host: the name, the labels this gateway finds its pods by, the
``nbcluster host`` arguments (the gateway URL, the host's name, ``--address $(POD_IP)``), the
GPU count, and the node the provider chose (ANDed with any node affinity of the template).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from .. import envvars
from ._container_hosts import LABEL_GATEWAY, LABEL_HOST, LABEL_PROVIDER, LABEL_ROLE
from ._errors import HostProviderError

__all__ = [
    "ADDRESS_ENV",
    "GPU_RESOURCE",
    "HOST_CONTAINER",
    "NodeRoom",
    "PodState",
    "check_pod_name",
    "check_template",
    "choose_node",
    "host_labels",
    "host_pod",
    "label_selector",
    "node_rooms",
    "pod_gpus",
    "pod_node",
    "pod_state",
    "uses_gpus",
]

#: The extended resource of NVIDIA's device plugin.
GPU_RESOURCE = "nvidia.com/gpu"
#: The container of the template that runs ``nbcluster host`` (else its only container).
HOST_CONTAINER = "host"
#: The host container's address (downward API ``status.podIP``: with ``hostNetwork`` that is
#: the node's address). Not ``NBCLUSTER_``: only nbcluster's own variables are (``envvars``).
ADDRESS_ENV = "POD_IP"

PodState = Literal["live", "stopping", "ended", "stuck"]

#: Arguments the provider sets itself; the template may not.
_OWN_ARGS = ("--gateway", "--name", "--address", "--gpus", "--gpu-devices", "--log-level")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def host_labels(gateway_id: str, name: str | None = None) -> dict[str, str]:
    """The labels of this gateway's host pods (with ``name``: of that one)."""
    labels = {LABEL_PROVIDER: "kubernetes", LABEL_GATEWAY: gateway_id, LABEL_ROLE: "host"}
    if name is not None:
        labels[LABEL_HOST] = name
    return labels


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def check_pod_name(name: str) -> None:
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot name a pod (lower-case letters, digits and '-', at most 63)"
        )


# -- the template -------------------------------------------------------------------------------


def _container(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    containers = spec.get("containers") or []
    named = [c for c in containers if c.get("name") == HOST_CONTAINER]
    if named:
        return dict(named[0])
    if len(containers) == 1:
        return dict(containers[0])
    raise HostProviderError(
        f"{where}: no container named {HOST_CONTAINER!r} among {len(containers)} containers"
    )


def uses_gpus(spec: Mapping[str, Any]) -> bool:
    """Whether the template's host container asks for ``nvidia.com/gpu`` (real GPUs, counted
    by the scheduler); without it the hosts get ``--gpus N`` virtual ones."""
    resources = _container(spec, "pod template").get("resources") or {}
    return any(GPU_RESOURCE in (resources.get(k) or {}) for k in ("limits", "requests"))


def check_template(template: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The pod spec of a ``PodTemplate`` (JSON), checked to make working host pods; ``where``
    names it in errors."""
    spec = (template.get("template") or {}).get("spec")
    if not isinstance(spec, dict) or not spec.get("containers"):
        raise HostProviderError(f"{where} has no pod spec with containers")
    if spec.get("restartPolicy", "Always") != "Always":
        # A host daemon that exits (a lost gateway, a crash) must come back under its name.
        raise HostProviderError(
            f"{where}: restartPolicy must be Always, not {spec['restartPolicy']!r}"
        )
    container = _container(spec, where)
    if container.get("command"):
        raise HostProviderError(
            f"{where}: the {container['name']} container sets a command; leave it to the "
            "image's entry point (nbcluster), the provider gives the arguments"
        )
    args = [str(a) for a in container.get("args") or []]
    for arg in args:
        if arg.split("=", 1)[0] in _OWN_ARGS:
            raise HostProviderError(
                f"{where}: the argument {arg.split('=', 1)[0]} is the provider's to set "
                f"(the template's args are added after them)"
            )
    token = [e for e in container.get("env") or [] if e.get("name") == envvars.JOIN_TOKEN.name]
    if token and "value" in token[0]:
        raise HostProviderError(
            f"{where}: {envvars.JOIN_TOKEN.name} is given as a value, readable by everyone "
            "who may read pods; take it from a Secret (valueFrom.secretKeyRef)"
        )
    if not token and not any(a.split("=", 1)[0] == "--join-token-file" for a in args):
        raise HostProviderError(
            f"{where}: hosts would have no join token: set {envvars.JOIN_TOKEN.name} from a "
            "Secret (valueFrom.secretKeyRef), or --join-token-file with the Secret mounted"
        )
    return spec


def host_pod(
    template: Mapping[str, Any],
    *,
    pod_name: str,
    labels: Mapping[str, str],
    gateway_url: str,
    host_name: str,
    log_level: str,
    gpus: int,
    node: str | None,
) -> dict[str, Any]:
    """The pod of host ``host_name`` (JSON, for ``create_namespaced_pod``) made from the
    template (checked by :func:`check_template`). ``gpus``: ``nvidia.com/gpu`` when the
    template asks for GPUs, else ``--gpus`` virtual ones. ``node``: pin it there (None: the
    scheduler picks)."""
    check_pod_name(pod_name)
    meta = (template.get("template") or {}).get("metadata") or {}
    spec = copy.deepcopy(check_template(template, "pod template"))
    index = next(
        (i for i, c in enumerate(spec["containers"]) if c.get("name") == HOST_CONTAINER), 0
    )
    container = spec["containers"][index]
    args = ["host", "--gateway", gateway_url, "--name", host_name]
    args += ["--address", f"$({ADDRESS_ENV})", "--log-level", log_level]
    resources = container.setdefault("resources", {})
    if uses_gpus(spec):
        if gpus < 1:
            raise HostProviderError("the pod template asks for GPUs: hosts need 1 or more")
        # Requests and limits of an extended resource must be equal when both are given.
        for key in ("limits", "requests"):
            if GPU_RESOURCE in (resources.get(key) or {}) or key == "limits":
                resources.setdefault(key, {})[GPU_RESOURCE] = str(gpus)
    else:
        args += ["--gpus", str(gpus)]
    container["args"] = args + [str(a) for a in container.get("args") or []]
    env = container.setdefault("env", [])
    if not any(e.get("name") == ADDRESS_ENV for e in env):
        env.append({"name": ADDRESS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if node is not None:
        _pin(spec, node)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "labels": {**(meta.get("labels") or {}), **labels},
            **({"annotations": dict(meta["annotations"])} if meta.get("annotations") else {}),
        },
        "spec": spec,
    }


def _pin(spec: dict[str, Any], node: str) -> None:
    """Require ``node`` (as the DaemonSet controller does: a ``metadata.name`` field term), in
    every term of the template's required node affinity, so both hold."""
    field = {"key": "metadata.name", "operator": "In", "values": [node]}
    required = (
        spec.setdefault("affinity", {})
        .setdefault("nodeAffinity", {})
        .setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term.setdefault("matchFields", []).append(field)


# -- nodes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRoom:
    """A node that can take host pods of the template: its ``nvidia.com/gpu`` allocatable,
    what this gateway's pods there leave of it, and how many of them are there."""

    name: str
    gpus: int
    free_gpus: int
    hosts: int


def _ready(node: Mapping[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    """Kubernetes' rule: an empty effect matches every effect; ``Exists`` with no key matches
    every taint; ``Equal`` (the default) needs the key and the value."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (
            taint.get("value") or ""
        ):
            return True
    return False


def _expression_holds(expression: Mapping[str, Any], value: str | None) -> bool:
    op, values = expression.get("operator"), list(expression.get("values") or [])
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and value.lstrip("-").isdigit() and values:
        number, bound = int(value), int(values[0])
        return number > bound if op == "Gt" else number < bound
    return False


def _affinity_holds(spec: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms") or []
    if not required:
        return True
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    fields = {"metadata.name": meta.get("name")}
    # Terms are ORed, the expressions of one term ANDed.
    return any(
        all(_expression_holds(e, labels.get(e.get("key"))) for e in t.get("matchExpressions") or [])
        and all(_expression_holds(e, fields.get(e.get("key"))) for e in t.get("matchFields") or [])
        for t in required
    )


def _fits(spec: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether the scheduler could put a pod of ``spec`` on ``node``, resources aside."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    node_spec = node.get("spec") or {}
    tolerations = spec.get("tolerations") or []
    return (
        _ready(node)
        and not node_spec.get("unschedulable")
        and all(labels.get(k) == v for k, v in (spec.get("nodeSelector") or {}).items())
        and all(
            _tolerated(taint, tolerations)
            for taint in node_spec.get("taints") or []
            if taint.get("effect") in ("NoSchedule", "NoExecute")
        )
        and _affinity_holds(spec, node)
    )


def pod_node(pod: Mapping[str, Any]) -> str | None:
    """The node a pod runs on, or the one it is pinned to while it waits to be scheduled."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    terms = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms") or []
    for term in terms:
        for field in term.get("matchFields") or []:
            if field.get("key") == "metadata.name" and len(field.get("values") or []) == 1:
                return str(field["values"][0])
    return None


def pod_gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        value = str(limits.get(GPU_RESOURCE, "0"))
        total += int(value) if value.isdigit() else 0
    return total


def node_rooms(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    spec: Mapping[str, Any],
) -> list[NodeRoom]:
    """The nodes a host pod of ``spec`` fits on, with the GPUs (``status.allocatable``) that
    this gateway's ``pods`` (those not ended) leave there. Other workloads' pods are not
    counted (that needs reading every pod of the cluster): a node they fill leaves our pod
    Pending, and :func:`pod_state` gives it up."""
    held: dict[str, int] = {}
    count: dict[str, int] = {}
    for pod in pods:
        node = pod_node(pod)
        if node is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        held[node] = held.get(node, 0) + pod_gpus(pod)
        count[node] = count.get(node, 0) + 1
    rooms = []
    for found in nodes:
        if not _fits(spec, found):
            continue
        name = str((found.get("metadata") or {}).get("name"))
        value = str(((found.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0"))
        gpus = int(value) if value.isdigit() else 0
        rooms.append(NodeRoom(name, gpus, max(0, gpus - held.get(name, 0)), count.get(name, 0)))
    return rooms


def choose_node(rooms: Sequence[NodeRoom], gpus: int | None) -> NodeRoom | None:
    """The node for the next host: with ``gpus`` (real GPUs) one with that many free, else
    any; the one with the fewest of our hosts first (a kernel's replicas go to different
    hosts: spreading them over nodes keeps a node's loss to one replica), then the most free
    GPUs, then by name. None: no node has room."""
    fits = [r for r in rooms if gpus is None or r.free_gpus >= gpus]
    if not fits:
        return None
    return min(fits, key=lambda r: (r.hosts, -r.free_gpus, r.name))


# -- pods ---------------------------------------------------------------------------------------


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def pod_state(pod: Mapping[str, Any], now: float, unschedulable_grace: float) -> PodState:
    """``live`` (running, or on its way), ``stopping`` (being deleted: it still holds its
    GPUs), ``ended`` (Succeeded or Failed, e.g. evicted: it will not run again) or ``stuck``
    (unschedulable for longer than ``unschedulable_grace`` seconds)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "stopping"
    status = pod.get("status") or {}
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return "ended"
    if phase in (None, "Pending"):
        for condition in status.get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                since = _timestamp(condition.get("lastTransitionTime"))
                if since is not None and now - since > unschedulable_grace:
                    return "stuck"
    return "live"
