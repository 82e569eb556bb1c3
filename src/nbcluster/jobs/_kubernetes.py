"""The Kubernetes runtimes: a job as a ``batch/v1`` Job, or as a Kubeflow ``TFJob`` /
``PyTorchJob`` for distributed training.

Who calls what:

* **The worker** picks :class:`KubernetesJobRuntime` (``runtime == "kubernetes"``) or
  :class:`TrainingJobRuntime` (``"tfjob"``, ``"pytorchjob"``), calls ``check()`` before it
  accepts the job, ``start()`` to create the cluster object, then awaits the handle's
  ``wait()`` (which polls the object's status and copies the pods' logs into ``log_path``) and
  calls ``cancel()`` on request or timeout (which deletes the object, and so its pods).
* The manifest builders (:func:`job_manifest`, :func:`training_manifest`) and their shape
  check (:func:`validate_manifest`) live in ``_kube_manifests`` (pure) and are re-exported
  here; the tests keep ``deploy/kubernetes/*.yaml`` equal to their output.
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

A little over 500 lines: both runtimes share one handle (status polling, log copying,
cancellation), which is most of the module.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import envvars
from ._kube_manifests import (
    JOB_CONTAINER,
    JOB_LABEL,
    KUBEFLOW_GROUP,
    KUBEFLOW_VERSION,
    RUN_LABEL,
    TRAINING,
    TrainingKind,
    job_manifest,
    resource_name,
    training_manifest,
    validate_manifest,
)
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
            container=JOB_CONTAINER,
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
        if kind not in TRAINING:
            raise ValueError(f"kind: {kind!r} is not one of {sorted(TRAINING)}")
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
            "plural": TRAINING[self.kind]["plural"],
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
            container=TRAINING[self.kind]["container"],
            log_path=log_path,
            poll=self.poll,
            prefix_pods=True,
        )
