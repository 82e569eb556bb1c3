"""The Kubernetes runtimes: a job as a ``batch/v1`` Job, or as a Kubeflow ``TFJob`` /
``PyTorchJob`` for distributed training.

Who calls what:

* **The worker** picks :class:`KubernetesJobRuntime` (``runtime == "kubernetes"``) or
  :class:`TrainingJobRuntime` (``"tfjob"``, ``"pytorchjob"``), calls ``check()`` before it
  accepts the job, ``start()`` to create the cluster object, then awaits the handle's
  ``wait()`` (which polls the object's status and copies the pods' logs into ``log_path``) and
  calls ``cancel()`` on request or timeout (which deletes the object, and so its pods).
* The manifest builders (:func:`job_manifest`, :func:`training_manifest`) are pure functions
  returning plain dicts; :func:`validate_manifest` checks their shape. The runtimes call them,
  and so do the tests that keep ``deploy/kubernetes/*.yaml`` equal to their output.
* Only the official ``kubernetes`` client is called: ``BatchV1Api``, ``CoreV1Api`` and
  ``CustomObjectsApi``. The default factories import it and load the cluster configuration
  (in-cluster service account, else ``~/.kube/config``) when a runtime first needs a client;
  importing this module does neither.

What differs from the process runtime: the pods do not see the worker's job directory, so a
command job runs its ``command`` as is, a source job runs ``python -c <source>``, and specs with
``inputs``, ``inline_inputs`` or ``outputs`` are refused by ``check()`` (the job reads and
writes the object store itself, through ``NBCLUSTER_STORE_URL``). Retries are the platform's
(``backoffLimit: 0``); GPUs are allocated by the cluster's device plugin
(``nvidia.com/gpu``), not by the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import math
import re
import secrets
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

from .. import envvars
from ._model import JobSpec
from ._runtime import JobHandle

__all__ = [
    "JOB_LABEL",
    "RUN_LABEL",
    "KubernetesJobRuntime",
    "TrainingJobRuntime",
    "TrainingKind",
    "job_manifest",
    "resource_name",
    "training_manifest",
    "validate_manifest",
]

log = logging.getLogger(__name__)

TrainingKind = Literal["TFJob", "PyTorchJob"]

#: Label on every object and pod of a job: the job's id.
JOB_LABEL = "nbcluster.io/job"
#: Label on every object and pod of one attempt (the object's name): pods are found by it.
RUN_LABEL = "nbcluster.io/run"

KUBEFLOW_GROUP = "kubeflow.org"
KUBEFLOW_VERSION = "v1"

#: Finished objects are removed by the cluster after this long (the log is in log_path).
TTL_AFTER_FINISHED = 3600

_TRAINING: dict[str, dict[str, str]] = {
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
_JOB_CONTAINER = "job"

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
                    "containers": [_container(spec, _JOB_CONTAINER, env)],
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
    if kind not in _TRAINING:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(_TRAINING)}")
    info = _TRAINING[kind]
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
    known = {("batch/v1", "Job")} | {(f"{KUBEFLOW_GROUP}/{KUBEFLOW_VERSION}", k) for k in _TRAINING}
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
    info = _TRAINING[str(kind)]
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


# ---------------------------------------------------------------------------------------------
# Clients

_config_lock = threading.Lock()
_config_loaded = False


def _kubernetes() -> Any:
    """The ``kubernetes`` package with the cluster configuration loaded (once): the pod's
    service account when running in a cluster, else the user's kube config."""
    global _config_loaded
    k8s = importlib.import_module("kubernetes")
    with _config_lock:
        if not _config_loaded:
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                k8s.config.load_kube_config()
            _config_loaded = True
    return k8s


def default_batch_api() -> Any:
    """A ``kubernetes.client.BatchV1Api`` (loads the configuration on first use)."""
    return _kubernetes().client.BatchV1Api()


def default_core_api() -> Any:
    """A ``kubernetes.client.CoreV1Api`` (loads the configuration on first use)."""
    return _kubernetes().client.CoreV1Api()


def default_custom_api() -> Any:
    """A ``kubernetes.client.CustomObjectsApi`` (loads the configuration on first use)."""
    return _kubernetes().client.CustomObjectsApi()


class _Lazy:
    """A client made by ``factory`` when first asked for, then kept."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value


def _field(obj: Any, *names: str) -> Any:
    """``obj.a.b`` for client models, ``obj["a"]["b"]`` for dicts (custom objects); None when
    any step is missing."""
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return obj


def _api_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    status = _api_status(exc)
    if status is None:
        return str(exc)
    reason = getattr(exc, "reason", "") or ""
    body = getattr(exc, "body", "") or ""
    return f"{status} {reason} {body}".strip()


def _check_kubernetes_spec(spec: JobSpec, runtime: str) -> None:
    if not spec.image:
        raise ValueError(f"image: required by the {runtime} runtime (the pods' image)")
    for field in ("inputs", "inline_inputs", "outputs"):
        if getattr(spec, field):
            raise ValueError(
                f"{field}: the {runtime} runtime's pods do not see the worker's job directory; "
                "read and write the object store from the job (NBCLUSTER_STORE_URL) instead"
            )


def _platform_env(env: Mapping[str, str]) -> dict[str, str]:
    """The platform's variables a pod gets from the worker's ``env``: ``NBCLUSTER_*`` but
    not the GPUs the worker's host bound (the pod's GPUs are the device plugin's)."""
    return {k: v for k, v in env.items() if k.startswith(envvars.PREFIX) and k != envvars.GPUS.name}


# ---------------------------------------------------------------------------------------------
# Handle: status polling and log following


class _LogSink:
    """``log_path``, written by several follower threads: whole lines, each prefixed with the
    pod it came from when there may be several pods."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {}

    def write(self, prefix: str, data: bytes) -> None:
        with self._lock, self._path.open("ab") as out:
            if not prefix:
                out.write(data)
                return
            lines = (self._partial.pop(prefix, b"") + data).split(b"\n")
            self._partial[prefix] = lines.pop()
            out.writelines(f"[{prefix}] ".encode() + line + b"\n" for line in lines)

    def end(self, prefix: str) -> None:
        with self._lock:
            rest = self._partial.pop(prefix, b"")
            if rest:
                with self._path.open("ab") as out:
                    out.write(f"[{prefix}] ".encode() + rest + b"\n")

    def note(self, text: str) -> None:
        """A line from the platform (a failure's reason, a pod that cannot start)."""
        with self._lock, self._path.open("ab") as out:
            out.write(f"[nbcluster] {text}\n".encode())


_WAITING_PROBLEMS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


class _KubeHandle:
    """One job's cluster object, as the worker sees it. ``wait()`` polls ``status()``
    (blocking; returns ``(exit code, reason)`` once the job ended, ``None`` before) every
    ``poll`` seconds and follows the logs of the pods labelled ``selector``; ``cancel()``
    calls ``delete()``."""

    def __init__(
        self,
        *,
        what: str,
        status: Callable[[], tuple[int, str] | None],
        delete: Callable[[], None],
        core: _Lazy,
        namespace: str,
        selector: str,
        container: str,
        log_path: Path,
        poll: float,
        prefix_pods: bool,
    ) -> None:
        self._what = what
        self._status = status
        self._delete = delete
        self._core = core
        self._namespace = namespace
        self._selector = selector
        self._container = container
        self._sink = _LogSink(log_path)
        self._poll = poll
        self._prefix_pods = prefix_pods
        self._followers: dict[str, threading.Thread] = {}
        self._noted: set[tuple[str, str]] = set()
        self._cancelled = False
        self._result: int | None = None

    async def wait(self) -> int:
        """0 when the job succeeded, 1 when it failed (the reason goes to the log), -15
        (as for SIGTERM) when it was cancelled or deleted."""
        if self._result is not None:
            return self._result
        errors = 0
        while True:
            try:
                ended = await asyncio.to_thread(self._status)
                errors = 0
            except Exception as exc:
                if _api_status(exc) == 404:
                    ended = self._gone()
                else:
                    errors += 1
                    log.warning("kubernetes: reading the status of %s: %s", self._what, exc)
                    if errors >= 30:
                        self._sink.note(f"cannot read the status of {self._what}: {_describe(exc)}")
                        ended = (1, "status unavailable")
                    else:
                        ended = None
            await self._follow_pods()
            if ended is not None:
                break
            await asyncio.sleep(self._poll)
        code, reason = ended
        await asyncio.to_thread(self._join_followers, 30.0)
        if code > 0 and reason:
            self._sink.note(f"{self._what} failed: {reason}")
        self._result = code
        return code

    def _gone(self) -> tuple[int, str]:
        if not self._cancelled:
            self._sink.note(f"{self._what} was deleted before it ended")
        return -signal.SIGTERM, ""

    async def cancel(self, grace: float = 5.0) -> None:
        """Delete the object (its pods go with it, ``propagationPolicy: Foreground``)."""
        self._cancelled = True
        try:
            await asyncio.to_thread(self._delete)
        except Exception as exc:
            if _api_status(exc) != 404:
                raise

    async def _follow_pods(self) -> None:
        try:
            pods = await asyncio.to_thread(
                self._core.get().list_namespaced_pod,
                namespace=self._namespace,
                label_selector=self._selector,
            )
        except Exception as exc:
            log.warning("kubernetes: listing the pods of %s: %s", self._what, exc)
            return
        for pod in _field(pods, "items") or []:
            name = _field(pod, "metadata", "name")
            if not name or name in self._followers:
                continue
            phase = _field(pod, "status", "phase")
            if phase in ("Running", "Succeeded", "Failed"):
                prefix = self._pod_prefix(pod) if self._prefix_pods else ""
                thread = threading.Thread(
                    target=self._follow, args=(name, prefix), name=f"logs-{name}", daemon=True
                )
                self._followers[name] = thread
                thread.start()
            else:
                self._note_waiting(name, pod)

    def _pod_prefix(self, pod: Any) -> str:
        labels = _field(pod, "metadata", "labels") or {}
        kind = labels.get("training.kubeflow.org/replica-type")
        index = labels.get("training.kubeflow.org/replica-index")
        if kind is not None and index is not None:
            return f"{str(kind).lower()}-{index}"
        return str(_field(pod, "metadata", "name"))

    def _note_waiting(self, name: str, pod: Any) -> None:
        for status in _field(pod, "status", "container_statuses") or []:
            waiting = _field(status, "state", "waiting")
            reason = _field(waiting, "reason")
            if reason in _WAITING_PROBLEMS and (name, reason) not in self._noted:
                self._noted.add((name, reason))
                message = _field(waiting, "message") or ""
                self._sink.note(f"pod {name}: {reason}: {message}".rstrip(": "))

    def _follow(self, pod: str, prefix: str) -> None:
        try:
            response = self._core.get().read_namespaced_pod_log(
                name=pod,
                namespace=self._namespace,
                container=self._container,
                follow=True,
                _preload_content=False,
            )
        except Exception as exc:
            self._sink.note(f"cannot read the log of pod {pod}: {_describe(exc)}")
            return
        try:
            for chunk in response.stream(65536):
                self._sink.write(prefix, chunk)
        except Exception as exc:
            self._sink.note(f"the log of pod {pod} ended early: {exc}")
        finally:
            self._sink.end(prefix)
            release = getattr(response, "release_conn", None)
            if release is not None:
                release()

    def _join_followers(self, timeout: float) -> None:
        for thread in list(self._followers.values()):
            thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# Runtimes


def _conditions_result(status: Any, success: str) -> tuple[int, str] | None:
    """(0, "") once a ``success`` condition is true, (1, reason) once ``Failed`` is."""
    for condition in _field(status, "conditions") or []:
        if str(_field(condition, "status")) != "True":
            continue
        kind = _field(condition, "type")
        if kind == success:
            return 0, ""
        if kind == "Failed":
            reason = _field(condition, "reason") or "Failed"
            message = _field(condition, "message") or ""
            return 1, f"{reason}: {message}" if message else str(reason)
    return None


class KubernetesJobRuntime:
    """Runs each job as a ``batch/v1`` Job in ``namespace`` (runtime name ``kubernetes``).

    ``batch_api_factory`` / ``core_api_factory`` make the ``BatchV1Api`` / ``CoreV1Api``
    clients (default: the official client, with the configuration loaded on first use); they
    are called at the first :meth:`start`. ``poll``: seconds between status reads.
    """

    name = "kubernetes"

    def __init__(
        self,
        batch_api_factory: Callable[[], Any] | None = None,
        core_api_factory: Callable[[], Any] | None = None,
        namespace: str = "default",
        poll: float = 1.0,
    ) -> None:
        self._batch = _Lazy(batch_api_factory or default_batch_api)
        self._core = _Lazy(core_api_factory or default_core_api)
        self.namespace = namespace
        self.poll = poll

    def check(self, spec: JobSpec) -> None:
        """Raise ``ValueError`` naming the field if a Job cannot run ``spec``."""
        _check_kubernetes_spec(spec, self.name)
        if spec.workers > 1:
            raise ValueError("workers: a Kubernetes Job runs one pod; use tfjob or pytorchjob")

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        """Create the Job (a new name per attempt: ``nbcluster-<id>-<random>``). Raises
        ``ValueError`` for a spec it cannot run, ``RuntimeError`` when the cluster refuses."""
        self.check(spec)
        name = resource_name(job_id, secrets.token_hex(3))
        manifest = job_manifest(job_id, spec, self.namespace, name=name, env=_platform_env(env))
        validate_manifest(manifest)
        batch = await asyncio.to_thread(self._batch.get)
        try:
            await asyncio.to_thread(
                batch.create_namespaced_job, namespace=self.namespace, body=manifest
            )
        except Exception as exc:
            if _api_status(exc) is None:
                raise
            raise RuntimeError(f"kubernetes: cannot create Job {name}: {_describe(exc)}") from exc
        namespace = self.namespace

        def status() -> tuple[int, str] | None:
            job = batch.read_namespaced_job_status(name=name, namespace=namespace)
            state = _field(job, "status")
            ended = _conditions_result(state, "Complete")
            if ended is not None:
                return ended
            if (_field(state, "succeeded") or 0) >= 1:
                return 0, ""
            if (_field(state, "failed") or 0) >= 1:
                return 1, "its pod failed"
            return None

        def delete() -> None:
            batch.delete_namespaced_job(
                name=name, namespace=namespace, propagation_policy="Foreground"
            )

        return _KubeHandle(
            what=f"Job {name}",
            status=status,
            delete=delete,
            core=self._core,
            namespace=namespace,
            selector=f"{RUN_LABEL}={name}",
            container=_JOB_CONTAINER,
            log_path=log_path,
            poll=self.poll,
            prefix_pods=False,
        )


class TrainingJobRuntime:
    """Runs each job as a Kubeflow ``TFJob`` or ``PyTorchJob`` (runtime names ``tfjob`` /
    ``pytorchjob``) with ``spec.workers`` pods; needs the Kubeflow training operator in the
    cluster. ``custom_api_factory`` / ``core_api_factory`` make the ``CustomObjectsApi`` /
    ``CoreV1Api`` clients (default: the official client, configuration loaded on first use).
    Each pod's log lines go to ``log_path`` prefixed with its replica (``[worker-1] ...``).
    """

    def __init__(
        self,
        custom_api_factory: Callable[[], Any] | None = None,
        core_api_factory: Callable[[], Any] | None = None,
        kind: TrainingKind = "PyTorchJob",
        namespace: str = "default",
        poll: float = 1.0,
    ) -> None:
        if kind not in _TRAINING:
            raise ValueError(f"kind: {kind!r} is not one of {sorted(_TRAINING)}")
        self.kind: TrainingKind = kind
        self.name = kind.lower()
        self._custom = _Lazy(custom_api_factory or default_custom_api)
        self._core = _Lazy(core_api_factory or default_core_api)
        self.namespace = namespace
        self.poll = poll

    def check(self, spec: JobSpec) -> None:
        """Raise ``ValueError`` naming the field if the training job cannot run ``spec``."""
        _check_kubernetes_spec(spec, self.name)

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        """Create the training job (a new name per attempt). Raises ``ValueError`` for a spec
        it cannot run, ``RuntimeError`` when the cluster refuses (e.g. no Kubeflow CRD)."""
        self.check(spec)
        name = resource_name(job_id, secrets.token_hex(3))
        manifest = training_manifest(
            job_id, spec, self.namespace, self.kind, name=name, env=_platform_env(env)
        )
        validate_manifest(manifest)
        custom = await asyncio.to_thread(self._custom.get)
        where = {
            "group": KUBEFLOW_GROUP,
            "version": KUBEFLOW_VERSION,
            "namespace": self.namespace,
            "plural": _TRAINING[self.kind]["plural"],
        }
        try:
            await asyncio.to_thread(custom.create_namespaced_custom_object, **where, body=manifest)
        except Exception as exc:
            if _api_status(exc) is None:
                raise
            raise RuntimeError(
                f"kubernetes: cannot create {self.kind} {name}: {_describe(exc)}"
            ) from exc

        def status() -> tuple[int, str] | None:
            obj = custom.get_namespaced_custom_object(**where, name=name)
            return _conditions_result(_field(obj, "status"), "Succeeded")

        def delete() -> None:
            custom.delete_namespaced_custom_object(
                **where, name=name, propagation_policy="Foreground"
            )

        return _KubeHandle(
            what=f"{self.kind} {name}",
            status=status,
            delete=delete,
            core=self._core,
            namespace=self.namespace,
            selector=f"{RUN_LABEL}={name}",
            container=_TRAINING[self.kind]["container"],
            log_path=log_path,
            poll=self.poll,
            prefix_pods=True,
        )
