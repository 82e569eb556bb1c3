"""The pure part of the ``kubernetes`` replica runtime (``_kube_replicas``): what a replica's
pod and its Secret look like, and what state a replica pod is in. Everything here works on the
API's JSON shapes (``dict``) and never calls the API server (docs/kubernetes.md, "Kernel images
as pods", says why each choice was made).

**The pod.** One per replica, in the host daemon's namespace, pinned to the daemon's node (a
required node affinity on ``metadata.name``, as the DaemonSet controller pins its pods, so the
scheduler still admits it and says ``Unschedulable`` when it cannot), with the daemon's pod as
its owner (Kubernetes deletes it with its host), ``restartPolicy: Never``, non-root, no
privilege escalation, every capability dropped, the ``RuntimeDefault`` seccomp profile, no
service account token, and a shared process namespace (the pause container is PID 1, so the
kernel is not, and SIGTERM ends it as it ends a process: Docker's ``--init``).

**Its sockets.** The pod has its own IP, so the kernel binds fixed ports
(:data:`KERNEL_PORTS`) on all of its addresses; the daemon builds the port report itself when
the pod is Ready (a TCP readiness probe on the heartbeat port: the kernel has bound its
sockets) and gives the gateway the pod's IP.

**Its secrets.** The connection file (the kernel's HMAC key, CURVE secret key) is a key of a
Secret per replica, mounted read-only at :data:`MOUNT` with mode 0400; environment variables
that carry secrets (:func:`is_secret_env`: the Raft password, the kernel's gateway token, the
store URL with its credentials) are ``secretKeyRef`` references to the same Secret. No secret
value is in the pod's spec.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .. import envvars

__all__ = [
    "APP_LABELS",
    "CONTAINER",
    "KERNEL_PORTS",
    "LABEL_HOST",
    "LABEL_KERNEL",
    "LABEL_REPLICA",
    "LABEL_ROLE",
    "MOUNT",
    "PodProgress",
    "SelfPod",
    "container_exit_code",
    "is_secret_env",
    "label_value",
    "pod_progress",
    "port_report",
    "replica_labels",
    "replica_pod",
    "replica_pod_name",
    "replica_secret",
    "selector",
]

#: The replica's container in its pod.
CONTAINER = "kernel"
#: Where the replica's Secret (connection file, gateway CA) is mounted in its pod.
MOUNT = "/run/nbcluster"
#: The ports a replica's kernel binds in its pod (on every address of the pod): the pod has
#: its own IP, so they are the same in every replica pod. ``raft_port`` is where pysyncobj
#: listens once the replica joins its group.
KERNEL_PORTS: Mapping[str, int] = {
    "shell_port": 5555,
    "iopub_port": 5556,
    "stdin_port": 5557,
    "control_port": 5558,
    "hb_port": 5559,
    "raft_port": 5560,
}
#: Labels of every replica pod and Secret (the values made label-safe by :func:`label_value`).
LABEL_ROLE = "nbcluster.role"
LABEL_HOST = "nbcluster.host"
LABEL_KERNEL = "nbcluster.kernel"
LABEL_REPLICA = "nbcluster.replica"
#: Labels of every replica pod besides those above: the NetworkPolicy of
#: deploy/kubernetes/components/kernel-pods selects them.
APP_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "nbcluster",
    "app.kubernetes.io/component": "kernel",
}
#: Environment variables the daemon must not hand to a replica (``_containers``' report and
#: lifeline FIFOs, which do not cross pods).
DROPPED_ENV = frozenset({envvars.REPORT_PATH.name, envvars.LIFELINE_PATH.name})
#: Waiting reasons of the kernel's container after which it will not start by itself.
FATAL_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
_SECRET_ENV = frozenset(v.name for v in envvars.ALL if v.secret) | {envvars.STORE_URL.name}
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class SelfPod:
    """The host daemon's own pod, as the replica pods need it: where they go, who owns them,
    and what of it they copy."""

    namespace: str
    name: str
    uid: str
    node: str
    tolerations: tuple[Mapping[str, Any], ...] = ()
    runtime_class: str | None = None
    image_pull_secrets: tuple[Mapping[str, Any], ...] = ()
    #: The daemon's volumes by mount path (for the object store's directory).
    volumes_by_path: Mapping[str, Mapping[str, Any]] | None = None

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any], container: str | None = None) -> SelfPod:
        """From the API's JSON of the daemon's pod; ``container``: the daemon's container
        (default: the first)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        containers = spec.get("containers") or [{}]
        own = next((c for c in containers if c.get("name") == container), containers[0])
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        by_path = {
            str(m["mountPath"]): volumes[m["name"]]
            for m in own.get("volumeMounts") or []
            if m.get("name") in volumes and not m.get("subPath")
        }
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            node=str(spec.get("nodeName") or ""),
            tolerations=tuple(spec.get("tolerations") or ()),
            runtime_class=spec.get("runtimeClassName"),
            image_pull_secrets=tuple(spec.get("imagePullSecrets") or ()),
            volumes_by_path=by_path,
        )

    def volume_holding(self, path: str) -> tuple[str, Mapping[str, Any]] | None:
        """The daemon's volume mounted at ``path`` or above it: (mount path, volume)."""
        for mount in sorted(self.volumes_by_path or {}, key=len, reverse=True):
            if path == mount or path.startswith(mount.rstrip("/") + "/"):
                return mount, (self.volumes_by_path or {})[mount]
        return None


def label_value(text: str) -> str:
    """``text`` as a label value: itself when it is one (63 characters at most, letters, digits,
    ``-_.``, alphanumeric ends), else ``h-`` and a digest of it (so the same text gives the
    same value: a restarted daemon finds its pods by it)."""
    if len(text) <= 63 and _LABEL_VALUE.fullmatch(text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def replica_labels(
    host: str, kernel_id: str | None = None, replica_id: str | None = None
) -> dict[str, str]:
    """The labels of ``host``'s replica pods (with the ids: of that replica's)."""
    labels = {LABEL_ROLE: "replica", LABEL_HOST: label_value(host)}
    if kernel_id is not None:
        labels[LABEL_KERNEL] = label_value(kernel_id)
    if replica_id is not None:
        labels[LABEL_REPLICA] = label_value(replica_id)
    return labels


def selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def replica_pod_name(replica_id: str) -> str:
    """The pod (and Secret) of replica ``replica_id``: a DNS label, unique per replica (the
    gateway's replica ids are), with a digest when the id had to be shortened or changed."""
    clean = _NOT_DNS.sub("-", replica_id.lower()).strip("-")
    name = f"nbcluster-replica-{clean}"
    if clean != replica_id or len(name) > 63:
        digest = hashlib.sha256(replica_id.encode()).hexdigest()[:10]
        name = f"{name[: 63 - len(digest) - 1].rstrip('-')}-{digest}"
    return name


def is_secret_env(name: str) -> bool:
    """Whether an environment variable's value goes in the replica's Secret (referenced from
    the pod with ``secretKeyRef``) rather than in the pod's spec."""
    return name in _SECRET_ENV or bool(_SECRET_NAME.search(name))


def _env_key(name: str) -> str:
    return f"env.{name}"


def _owner(owner: SelfPod) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": owner.name,
        "uid": owner.uid,
        # True would need the right to update the owner's finalizers (more RBAC), and the
        # host pod's deletion need not wait for its replicas': the collector follows.
        "blockOwnerDeletion": False,
        "controller": False,
    }


def replica_secret(
    *,
    name: str,
    owner: SelfPod,
    labels: Mapping[str, str],
    files: Mapping[str, bytes],
    env: Mapping[str, str],
) -> dict[str, Any]:
    """The replica's Secret (JSON, for ``create_namespaced_secret``): ``files`` (mounted at
    :data:`MOUNT`) and the secret values of ``env`` (as ``env.NAME`` keys). Owned by the
    daemon's pod: it goes with the host even when the daemon could not delete it."""
    data = {key: base64.b64encode(value).decode() for key, value in files.items()}
    data |= {
        _env_key(k): base64.b64encode(v.encode()).decode()
        for k, v in env.items()
        if is_secret_env(k)
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {"name": name, "labels": dict(labels), "ownerReferences": [_owner(owner)]},
        "data": data,
    }


def replica_pod(
    *,
    name: str,
    owner: SelfPod,
    labels: Mapping[str, str],
    image: str,
    argv: list[str],
    env: Mapping[str, str],
    files: list[str],
    user: tuple[int, int],
    store: tuple[str, Mapping[str, Any]] | None = None,
    termination_grace: int = 30,
) -> dict[str, Any]:
    """The replica's pod (JSON, for ``create_namespaced_pod``). ``env``: the kernel's, secret
    values included (they become references to the Secret ``name``); ``files``: the Secret's
    keys to mount at :data:`MOUNT`; ``user``: uid and gid (never 0); ``store``: the object
    store's directory and the daemon's volume that holds it (mounted at the same path)."""
    uid, gid = user
    if uid == 0:
        raise ValueError("replica pods never run as root (uid 0)")
    container_env: list[dict[str, Any]] = []
    for key, value in sorted(env.items()):
        if key in DROPPED_ENV:
            continue
        if is_secret_env(key):
            ref = {"name": name, "key": _env_key(key)}
            container_env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
        else:
            container_env.append({"name": key, "value": value})
    mounts: list[dict[str, Any]] = [{"name": "nbcluster", "mountPath": MOUNT, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {
            "name": "nbcluster",
            "secret": {
                "secretName": name,
                # 0400: the kubelet gives the files to the pod's fsGroup (the kernel's group)
                # and adds group read; nothing else in the pod reads them.
                "defaultMode": 0o400,
                "items": [{"key": f, "path": f} for f in files],
            },
        }
    ]
    if store is not None:
        path, volume = store
        volumes.append({**volume, "name": "store"})
        mounts.append({"name": "store", "mountPath": path})
    hb = KERNEL_PORTS["hb_port"]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        # The kernelspec's argv whole: the image's entry point is not the kernel's.
        "command": list(argv),
        "env": container_env,
        "ports": [
            {"name": key.removesuffix("_port").replace("_", "-"), "containerPort": port}
            for key, port in KERNEL_PORTS.items()
        ],
        # The kernel has bound its sockets once its heartbeat port answers.
        "readinessProbe": {
            "tcpSocket": {"port": hb},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [owner.node]}
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": [dict(t) for t in owner.tolerations],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "shareProcessNamespace": True,
        "terminationGracePeriodSeconds": termination_grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if not spec["tolerations"]:
        del spec["tolerations"]
    if owner.runtime_class:
        spec["runtimeClassName"] = owner.runtime_class
    if owner.image_pull_secrets:
        spec["imagePullSecrets"] = [dict(s) for s in owner.image_pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {**APP_LABELS, **labels},
            "ownerReferences": [_owner(owner)],
        },
        "spec": spec,
    }


def port_report(curve: bool) -> dict[str, Any]:
    """What a replica process writes on its report pipe, for a replica pod (its ports are
    :data:`KERNEL_PORTS`). ``curve``: whether its connection file carries CURVE keys (the
    image's ipykernel must be 7.3 or later to serve them: docs/kubernetes.md)."""
    return {"transport": "tcp", **KERNEL_PORTS, "curve": curve}


# -- the pod's state ----------------------------------------------------------------------------

#: ``starting`` (on its way; ``detail`` says where it is), ``ready`` (Running with an IP, its
#: kernel's sockets bound), ``failed`` (will not start: ``detail`` says why), ``exited`` (its
#: kernel ended: ``code``).
ProgressState = Literal["starting", "ready", "failed", "exited"]


@dataclass(frozen=True)
class PodProgress:
    state: ProgressState
    detail: str = ""
    ip: str | None = None
    code: int | None = None
    #: Whether the kernel's container has started (its log can be read).
    started: bool = False


def _kernel_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return dict(status)
    return {}


def container_exit_code(pod: Mapping[str, Any]) -> int | None:
    """The kernel container's exit code, once it terminated."""
    terminated = (_kernel_status(pod).get("state") or {}).get("terminated")
    if terminated and terminated.get("exitCode") is not None:
        return int(terminated["exitCode"])
    return None


def pod_progress(pod: Mapping[str, Any]) -> PodProgress:
    """Where a replica pod is (the API's JSON of it)."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    kernel = _kernel_status(pod)
    state = kernel.get("state") or {}
    started = bool(state.get("running") or state.get("terminated"))
    code = container_exit_code(pod)
    if code is not None:
        return PodProgress("exited", f"exit code {code}", code=code, started=started)
    if phase in ("Failed", "Succeeded"):
        # Ended without its container's state: refused by the kubelet (OutOfcpu, NodeAffinity),
        # evicted, or its node lost.
        reason = status.get("reason") or phase
        message = status.get("message") or ""
        return PodProgress("failed", f"{phase}: {reason}: {message}".rstrip(": "))
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING:
        return PodProgress("failed", f"{waiting['reason']}: {waiting.get('message') or ''}")
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            # Pinned to its host's node: it will not fit elsewhere.
            return PodProgress("failed", f"Unschedulable: {condition.get('message') or ''}")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ip = status.get("podIP")
    if phase == "Running" and ip and ready:
        return PodProgress("ready", "Running", ip=str(ip), started=True)
    where = waiting.get("reason") or ("Running, not ready" if phase == "Running" else phase)
    return PodProgress("starting", str(where), ip=ip, started=started)
