"""Kubernetes manifests for jobs: a ``batch/v1`` Job, or a Kubeflow ``TFJob`` / ``PyTorchJob``.

Pure functions returning plain dicts (:func:`job_manifest`, :func:`training_manifest`) and a
shape check (:func:`validate_manifest`). Called by the runtimes in ``_kubernetes`` (which
re-exports them) and by the tests that keep ``deploy/kubernetes/*.yaml`` equal to their output.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

from ._model import JobSpec

__all__ = [
    "JOB_CONTAINER",
    "JOB_LABEL",
    "KUBEFLOW_GROUP",
    "KUBEFLOW_VERSION",
    "RUN_LABEL",
    "TRAINING",
    "TrainingKind",
    "job_manifest",
    "resource_name",
    "training_manifest",
    "validate_manifest",
]

TrainingKind = Literal["TFJob", "PyTorchJob"]

#: Label on every object and pod of a job: the job's id.
JOB_LABEL = "nbcluster.io/job"
#: Label on every object and pod of one attempt (the object's name): pods are found by it.
RUN_LABEL = "nbcluster.io/run"

KUBEFLOW_GROUP = "kubeflow.org"
KUBEFLOW_VERSION = "v1"

#: Finished objects are removed by the cluster after this long (the log is in log_path).
TTL_AFTER_FINISHED = 3600

TRAINING: dict[str, dict[str, str]] = {
    "TFJob": {"plural": "tfjobs", "replicas": "tfReplicaSpecs", "container": "tensorflow"},
    "PyTorchJob": {
        "plural": "pytorchjobs",
        "replicas": "pytorchReplicaSpecs",
        "container": "pytorch",
    },
}
_REPLICA_TYPES: dict[str, frozenset[str]] = {
    "TFJob": frozenset({"Chief", "Master", "Worker", "PS", "Evaluator"}),
    "PyTorchJob": frozenset({"Master", "Worker"}),
}
JOB_CONTAINER = "job"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_KEY_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# ---------------------------------------------------------------------------------------------
# Manifests


def resource_name(job_id: str, suffix: str = "") -> str:
    """The name of a job's cluster object: ``nbcluster-<id>[-<suffix>]``, a DNS-1123 label of
    at most 63 characters (an id that is not one is lowered, cleaned and shortened with a hash
    of the original, so that different ids keep different names)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    tail = f"-{suffix}" if suffix else ""
    room = 63 - len("nbcluster-") - len(tail)
    if cleaned != job_id or len(cleaned) > room:
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: max(0, room - 9)].strip('-')}-{digest}".strip("-")
    return f"nbcluster-{cleaned}{tail}"


def _label_value(value: str) -> str:
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    return resource_name(value).removeprefix("nbcluster-")


def _cpu_quantity(cpus: float) -> str:
    if float(cpus).is_integer():
        return str(int(cpus))
    return f"{max(1, round(cpus * 1000))}m"


def _resources(spec: JobSpec) -> dict[str, dict[str, str]]:
    res = spec.resources
    quantities = {"cpu": _cpu_quantity(res.cpus), "memory": f"{res.memory_mb}Mi"}
    if res.gpus > 0:
        quantities["nvidia.com/gpu"] = str(res.gpus)
    # Requests equal limits: the scheduler places the pod where all of it fits (and extended
    # resources such as GPUs must have equal requests and limits anyway).
    return {"requests": dict(quantities), "limits": dict(quantities)}


def _argv(spec: JobSpec) -> list[str]:
    if spec.command is not None:
        return list(spec.command)
    return ["python", "-c", spec.source or ""]


def _container(spec: JobSpec, name: str, env: Mapping[str, str] | None) -> dict[str, Any]:
    variables = {**spec.env, **(env or {})}
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image or "",
        "command": _argv(spec),
        "resources": _resources(spec),
    }
    if variables:
        container["env"] = [{"name": k, "value": v} for k, v in sorted(variables.items())]
    return container


def _labels(job_id: str, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "nbcluster",
        JOB_LABEL: _label_value(job_id),
        RUN_LABEL: name,
    }


def _metadata(job_id: str, spec: JobSpec, name: str, namespace: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": _labels(job_id, name),
    }
    if spec.name:
        metadata["annotations"] = {"nbcluster.io/name": spec.name}
    return metadata


def _deadline(spec: JobSpec) -> int:
    return max(1, math.ceil(spec.timeout))


def job_manifest(
    job_id: str,
    spec: JobSpec,
    namespace: str = "default",
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs ``spec`` once: one pod, ``restartPolicy: Never``,
    ``backoffLimit: 0`` (retries are the platform's), ``activeDeadlineSeconds`` = the job's
    timeout. ``name`` defaults to :func:`resource_name`; ``env`` adds to ``spec.env``."""
    name = name or resource_name(job_id)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job_id, spec, name, namespace),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": _deadline(spec),
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            "template": {
                "metadata": {"labels": _labels(job_id, name)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [_container(spec, JOB_CONTAINER, env)],
                },
            },
        },
    }


def training_manifest(
    job_id: str,
    spec: JobSpec,
    namespace: str = "default",
    kind: TrainingKind = "PyTorchJob",
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Kubeflow (``kubeflow.org/v1``) training job that runs ``spec`` on
    ``spec.workers`` pods, each with ``spec.resources``.

    * ``PyTorchJob``: one ``Master`` and ``workers - 1`` ``Worker`` replicas (no ``Worker``
      entry for a single worker); the container is named ``pytorch``, as the operator requires
      (it sets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` in it).
    * ``TFJob``: ``workers`` ``Worker`` replicas only, no ``Chief`` nor ``PS`` (worker 0 acts
      as the chief, as ``MultiWorkerMirroredStrategy`` expects); the container is named
      ``tensorflow`` and gets ``TF_CONFIG`` from the operator.

    Replicas never restart (``restartPolicy: Never``, ``runPolicy.backoffLimit: 0``) and the
    whole job is bounded by ``runPolicy.activeDeadlineSeconds`` = the job's timeout.
    """
    if kind not in TRAINING:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(TRAINING)}")
    info = TRAINING[kind]
    name = name or resource_name(job_id)

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"labels": _labels(job_id, name)},
                "spec": {"containers": [_container(spec, info["container"], env)]},
            },
        }

    if kind == "PyTorchJob":
        replicas = {"Master": replica(1)}
        if spec.workers > 1:
            replicas["Worker"] = replica(spec.workers - 1)
    else:
        replicas = {"Worker": replica(spec.workers)}
    return {
        "apiVersion": f"{KUBEFLOW_GROUP}/{KUBEFLOW_VERSION}",
        "kind": kind,
        "metadata": _metadata(job_id, spec, name, namespace),
        "spec": {
            "runPolicy": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": _deadline(spec),
                "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
                "cleanPodPolicy": "None",
            },
            info["replicas"]: replicas,
        },
    }


# ---------------------------------------------------------------------------------------------
# Validation


def _fail(path: str, problem: str) -> NoReturn:
    raise ValueError(f"{path}: {problem}")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping, not {type(value).__name__}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(path, "must be a non-empty string")
    return value


def _integer(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"must be an integer, not {type(value).__name__}")
    if value < minimum:
        _fail(path, f"must be at least {minimum}, not {value}")
    return value


def _dns_label(value: Any, path: str) -> None:
    text = _string(value, path)
    if len(text) > 63 or not _DNS_LABEL.match(text):
        _fail(
            path,
            f"{text!r} is not a DNS-1123 label (at most 63 characters: lower-case letters, "
            "digits and '-', starting and ending with a letter or digit)",
        )


def _check_labels(value: Any, path: str) -> None:
    for key, val in _mapping(value, path).items():
        prefix, _, name = str(key).rpartition("/")
        if (
            not isinstance(key, str)
            or not name
            or len(name) > 63
            or not _LABEL_KEY_NAME.match(name)
            or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))
        ):
            _fail(f"{path}.{key}", "is not a valid label key")
        if not isinstance(val, str) or len(val) > 63 or not _LABEL_VALUE.match(val):
            _fail(f"{path}.{key}", f"{val!r} is not a valid label value")


def _check_metadata(value: Any, path: str) -> None:
    metadata = _mapping(value, path)
    _dns_label(metadata.get("name"), f"{path}.name")
    if "namespace" in metadata:
        _dns_label(metadata["namespace"], f"{path}.namespace")
    if "labels" in metadata:
        _check_labels(metadata["labels"], f"{path}.labels")
    if "annotations" in metadata:
        for key, val in _mapping(metadata["annotations"], f"{path}.annotations").items():
            if not isinstance(val, str):
                _fail(f"{path}.annotations.{key}", "must be a string")


def _check_container(value: Any, path: str) -> str:
    container = _mapping(value, path)
    _dns_label(container.get("name"), f"{path}.name")
    _string(container.get("image"), f"{path}.image")
    for field in ("command", "args"):
        if field in container:
            argv = container[field]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                _fail(f"{path}.{field}", "must be a list of strings")
            if field == "command" and not argv:
                _fail(f"{path}.{field}", "must not be empty")
    if "env" in container:
        variables = container["env"]
        if not isinstance(variables, list):
            _fail(f"{path}.env", "must be a list")
        for i, item in enumerate(variables):
            entry = _mapping(item, f"{path}.env[{i}]")
            var = _string(entry.get("name"), f"{path}.env[{i}].name")
            if not _ENV_NAME.match(var):
                _fail(f"{path}.env[{i}].name", f"{var!r} is not a valid variable name")
            if not isinstance(entry.get("value", ""), str):
                _fail(f"{path}.env[{i}].value", "must be a string")
    if "resources" in container:
        resources = _mapping(container["resources"], f"{path}.resources")
        for part, quantities in resources.items():
            if part not in ("requests", "limits"):
                _fail(f"{path}.resources.{part}", "is not requests or limits")
            for resource, quantity in _mapping(quantities, f"{path}.resources.{part}").items():
                where = f"{path}.resources.{part}.{resource}"
                if not isinstance(quantity, str):
                    _fail(where, f"must be a quantity string (e.g. '2', '500m'), not {quantity!r}")
                if not _QUANTITY.match(quantity):
                    _fail(where, f"{quantity!r} is not a Kubernetes quantity")
    return str(container["name"])


def _check_pod_template(value: Any, path: str, restart: frozenset[str] | None) -> list[str]:
    template = _mapping(value, path)
    if "metadata" in template:
        metadata = _mapping(template["metadata"], f"{path}.metadata")
        if "labels" in metadata:
            _check_labels(metadata["labels"], f"{path}.metadata.labels")
    pod = _mapping(template.get("spec"), f"{path}.spec")
    if restart is not None:
        policy = pod.get("restartPolicy")
        if policy not in restart:
            _fail(f"{path}.spec.restartPolicy", f"must be one of {sorted(restart)}, not {policy!r}")
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        _fail(f"{path}.spec.containers", "must be a non-empty list")
    names = [_check_container(c, f"{path}.spec.containers[{i}]") for i, c in enumerate(containers)]
    if len(set(names)) != len(names):
        _fail(f"{path}.spec.containers", "container names must be unique")
    return names


def validate_manifest(manifest: Any) -> None:
    """Check a manifest built here (or read from ``deploy/kubernetes``) strictly: its
    ``apiVersion``/``kind``, ``metadata.name`` (a DNS-1123 label), labels, the pod templates
    (non-empty ``containers`` with a ``name`` and an ``image``; quantities as strings), the
    Job's ``backoffLimit``/``activeDeadlineSeconds`` and the training job's replica specs
    (known replica types, ``replicas`` ≥ 1, the container name the operator requires).

    Raises ``ValueError("<path>: <problem>")``, e.g.
    ``spec.template.spec.containers[0].image: must be a non-empty string``.
    """
    top = _mapping(manifest, "manifest")
    api_version, kind = top.get("apiVersion"), top.get("kind")
    known = {("batch/v1", "Job")} | {(f"{KUBEFLOW_GROUP}/{KUBEFLOW_VERSION}", k) for k in TRAINING}
    if (api_version, kind) not in known:
        if api_version not in {a for a, _ in known}:
            _fail("apiVersion", f"{api_version!r} is not one of {sorted({a for a, _ in known})}")
        _fail("kind", f"{kind!r} is not a kind of {api_version}")
    _check_metadata(top.get("metadata"), "metadata")
    spec = _mapping(top.get("spec"), "spec")
    if kind == "Job":
        _integer(spec.get("backoffLimit", 0), "spec.backoffLimit", 0)
        if "activeDeadlineSeconds" in spec:
            _integer(spec["activeDeadlineSeconds"], "spec.activeDeadlineSeconds", 1)
        if "ttlSecondsAfterFinished" in spec:
            _integer(spec["ttlSecondsAfterFinished"], "spec.ttlSecondsAfterFinished", 0)
        _check_pod_template(
            spec.get("template"), "spec.template", frozenset({"Never", "OnFailure"})
        )
        return
    info = TRAINING[str(kind)]
    if "runPolicy" in spec:
        policy = _mapping(spec["runPolicy"], "spec.runPolicy")
        for field, minimum in (
            ("backoffLimit", 0),
            ("activeDeadlineSeconds", 1),
            ("ttlSecondsAfterFinished", 0),
        ):
            if field in policy:
                _integer(policy[field], f"spec.runPolicy.{field}", minimum)
    key = info["replicas"]
    replicas = _mapping(spec.get(key), f"spec.{key}")
    if not replicas:
        _fail(f"spec.{key}", "must have at least one replica type")
    for replica_type, replica in replicas.items():
        path = f"spec.{key}.{replica_type}"
        if replica_type not in _REPLICA_TYPES[str(kind)]:
            _fail(path, f"is not one of {sorted(_REPLICA_TYPES[str(kind)])}")
        entry = _mapping(replica, path)
        count = _integer(entry.get("replicas"), f"{path}.replicas", 1)
        if replica_type in ("Master", "Chief") and count != 1:
            _fail(f"{path}.replicas", f"a {replica_type} has exactly 1 replica, not {count}")
        restart = entry.get("restartPolicy", "Never")
        if restart not in ("Never", "OnFailure", "Always", "ExitCode"):
            _fail(f"{path}.restartPolicy", f"{restart!r} is not a restart policy")
        names = _check_pod_template(entry.get("template"), f"{path}.template", None)
        if info["container"] not in names:
            _fail(
                f"{path}.template.spec.containers",
                f"the {kind} operator needs a container named {info['container']!r}",
            )
    if kind == "PyTorchJob" and "Master" not in replicas:
        _fail(f"spec.{key}.Master", "a PyTorchJob needs a Master replica")
