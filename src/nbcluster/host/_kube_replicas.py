"""Kernel replicas as Kubernetes pods: for kernelspecs that name an image, on a host daemon
that itself runs in a pod and was started with ``--container-runtime kubernetes``.

Who calls what: as for ``_containers`` (Docker), the daemon gives its
:class:`~nbcluster.host._processes.ReplicaSupervisor` a :class:`KubernetesReplicaRuntime`; the
supervisor makes the replica's directory (connection file, gateway CA, report FIFO), calls
:meth:`KubernetesReplicaRuntime.run`, and treats the returned :class:`PodReplica` like a
process. What crosses to the pod is in a Secret (nothing is shared by files: the pod may not
see the daemon's); what comes back is read from the API: the pod's IP, its readiness, its
container's exit code, its log. The pure part (the pod, the Secret, the state of a pod) is in
``_kube_replica_pods``; docs/kubernetes.md, "Kernel images as pods", says why each choice.

The daemon's pod is found from the downward API: :data:`NAMESPACE_ENV`, :data:`POD_NAME_ENV`
and :data:`POD_UID_ENV` (deploy/kubernetes/components/kernel-pods sets them).

Over 500 lines, knowingly: :class:`PodReplica` is a handle on the runtime's one poller and
one deletion path (a signal asks the runtime to delete, the poller confirms and ends the
handle), so the two read each other's state; the pure part, which can stand alone, is already
apart (``_kube_replica_pods``), as is the client's construction (``nbcluster._kube_api``).

The ``kubernetes`` client is imported on first use; its calls block, and run in worker
threads. Replica pods are followed by one poller per runtime: a list of this host's replica
pods (by label) every :attr:`KubernetesReplicaRuntime.poll_interval` seconds while any runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import envvars
from .._kube_api import (
    KubeConfigMissing,
    api_status,
    describe_api_error,
    new_core_api,
)
from ._containers import DEFAULT_CONTAINER_USER, ContainerRuntimeError, _local_store_dir
from ._kube_replica_pods import (
    CONTAINER,
    KERNEL_PORTS,
    PodProgress,
    SelfPod,
    pod_progress,
    port_report,
    replica_labels,
    replica_pod,
    replica_pod_name,
    replica_secret,
    selector,
)

__all__ = [
    "NAMESPACE_ENV",
    "POD_NAME_ENV",
    "POD_UID_ENV",
    "KubernetesReplicaRuntime",
    "PodReplica",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The daemon's own pod, from the downward API (``metadata.namespace``, ``metadata.name``,
#: ``metadata.uid``). Not ``NBCLUSTER_``: only nbcluster's own variables are (``envvars``).
NAMESPACE_ENV = "POD_NAMESPACE"
POD_NAME_ENV = "POD_NAME"
POD_UID_ENV = "POD_UID"
#: The GPUs NVIDIA's device plugin gave the daemon's pod; replica pods get the same.
NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
#: The exit code of a replica whose pod could not start or vanished without one.
LOST = -1


def default_core_api() -> Any:
    """A ``CoreV1Api`` on the pod's service account (else the kube config). Blocking."""
    try:
        return new_core_api()
    except KubeConfigMissing as exc:
        raise ContainerRuntimeError(str(exc)) from None


class _ApiError(ContainerRuntimeError):
    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class PodReplica:
    """One replica's pod, shaped like ``asyncio.subprocess.Process``. ``pid`` is 0: its
    process is in another pod."""

    runtime: KubernetesReplicaRuntime = field(repr=False)
    name: str
    replica_dir: Path = field(repr=False)
    curve: bool = field(repr=False)
    pid: int = 0
    returncode: int | None = None
    #: The pod's IP, once it is Ready: where its sockets listen (the gateway is told it).
    address: str | None = None
    log_path: Path | None = field(default=None, repr=False)
    #: The last signal that deleted the pod (its exit code, -signum, when none is seen).
    signalled: int | None = None
    #: The last state written to the replica's log.
    detail: str = ""
    #: Whether its container started (it has a log to read).
    container_started: bool = False
    #: The grace period of the deletion the last signal asked for, and whether one is being
    #: sent (the poller asks again while the pod is not being deleted: the API may have failed).
    grace: int | None = None
    deleting: bool = False
    #: When a SIGKILL's deletion, unconfirmed, is given up (``time.monotonic()``).
    give_up_at: float | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: Set (from the event loop) once the container started or the replica ended: the log
    #: thread waits for it.
    started: threading.Event = field(default_factory=threading.Event, repr=False)

    def _end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self.started.set()
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Kubernetes has no signal API: SIGTERM deletes the pod with the runtime's grace
        period (the kubelet sends SIGTERM, then SIGKILL), SIGKILL deletes it at once; other
        signals cannot be delivered (an interrupt needs ``interrupt_mode: message``)."""
        if self.returncode is not None:
            return
        if signum == signal.SIGTERM:
            grace = self.runtime.term_grace
        elif signum == signal.SIGKILL:
            grace = 0
        else:
            try:
                what: object = signal.Signals(signum).name
            except ValueError:
                what = signum
            log.warning(
                "replica pod %s: signal %s cannot reach a pod (Kubernetes has no signal API); "
                'interrupting a kernel in an image needs "interrupt_mode": "message" in its '
                "kernelspec",
                self.name,
                what,
            )
            return
        self.signalled = signum
        self.grace = grace if self.grace is None else min(grace, self.grace)
        if signum == signal.SIGKILL and self.give_up_at is None:
            self.give_up_at = time.monotonic() + self.runtime.kill_timeout
        self.runtime._spawn(self.runtime._delete_replica_pod(self))

    async def release(self) -> None:
        """After its end: delete the pod and its Secret (both go with the daemon's pod too)."""
        self.runtime._forget(self)
        await self.runtime._delete_pod(self.name, 0)
        await self.runtime._delete_secret(self.name)


class KubernetesReplicaRuntime:
    """Runs replica pods beside the daemon's own pod (module docstring).

    ``container_user``: ``uid:gid`` of the kernels (numeric: the pod must be provably
    non-root); default 1000:1000, the nbcluster image's user. ``api``: a ``CoreV1Api``
    (default: :func:`default_core_api`, made at the first call). ``environ``: where the
    downward API's variables are read (default: ``os.environ``)."""

    name = "kubernetes"

    def __init__(
        self,
        host_name: str,
        *,
        container_user: str | None = None,
        api: Any = None,
        environ: Mapping[str, str] | None = None,
        poll_interval: float = 1.0,
        term_grace: int = 30,
        kill_timeout: float = 30.0,
    ) -> None:
        self._host = host_name
        user = container_user or DEFAULT_CONTAINER_USER
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit() or int(uid) == 0:
            raise ValueError(
                f"--container-user {user!r}: replica pods need a numeric uid:gid other than "
                "root's (Kubernetes checks runAsNonRoot against the number)"
            )
        self.user = (int(uid), int(gid or uid))
        self._api = api
        self._api_lock = threading.Lock()
        self._environ = os.environ if environ is None else environ
        self.poll_interval = poll_interval
        #: The grace period of a pod deleted for SIGTERM (seconds), and its spec's.
        self.term_grace = term_grace
        #: Seconds after a SIGKILL when a pod the API has not seen go (it fails, or its node
        #: is lost) counts as ended anyway, so that a stop never hangs: the pod goes with the
        #: host's pod, or at the daemon's next start (leftovers).
        self.kill_timeout = kill_timeout
        self.pod: SelfPod | None = None
        self._replicas: dict[str, PodReplica] = {}
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the API ------------------------------------------------------------------------------

    def _client(self) -> Any:
        """The ``CoreV1Api`` (made at the first call). Blocking."""
        with self._api_lock:
            if self._api is None:
                self._api = default_core_api()
            return self._api

    async def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """``call(api)`` in a worker thread; the client's errors become a
        :class:`ContainerRuntimeError` naming ``what`` was being done."""

        def run() -> T:
            return call(self._client())

        try:
            return await asyncio.to_thread(run)
        except ContainerRuntimeError:
            raise
        except Exception as exc:
            hint = ""
            if api_status(exc) == 403:
                hint = (
                    " (the host's service account lacks the permission: apply "
                    "deploy/kubernetes/components/kernel-pods' RBAC)"
                )
            raise _ApiError(f"{what}: {describe_api_error(exc)}{hint}", api_status(exc)) from None

    @property
    def namespace(self) -> str:
        assert self.pod is not None, "check() first"
        return self.pod.namespace

    def _own(self, name: str) -> str:
        value = self._environ.get(name, "")
        if not value:
            raise ContainerRuntimeError(
                f"{name} is not set: the host daemon must run in a pod, with {NAMESPACE_ENV}, "
                f"{POD_NAME_ENV} and {POD_UID_ENV} from the downward API "
                "(deploy/kubernetes/components/kernel-pods)"
            )
        return value

    async def check(self) -> None:
        """Read the daemon's own pod (daemon start-up): fails now, with the reason, when it
        is not in a pod, the API does not answer, or the service account may not read pods."""
        namespace, name, uid = (self._own(v) for v in (NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV))
        found: dict[str, Any] = await self._call(
            f"read the host's own pod {namespace}/{name}",
            lambda api: api.api_client.sanitize_for_serialization(
                api.read_namespaced_pod(name, namespace)
            ),
        )
        pod = SelfPod.from_pod(found, container="host")
        if pod.uid != uid:
            raise ContainerRuntimeError(
                f"pod {namespace}/{name} has uid {pod.uid}, not {POD_UID_ENV}={uid}: "
                "a pod of that name replaced this one"
            )
        if not pod.node:
            raise ContainerRuntimeError(f"pod {namespace}/{name} is on no node")
        self.pod = pod

    async def remove_leftovers(self) -> list[str]:
        """Delete the replica pods (and their Secrets) an earlier run of this host daemon left
        (it died, its container restarted); returns their names."""
        labels = replica_labels(self._host)
        found = await self._call(
            f"list the replica pods of host {self._host}",
            lambda api: api.api_client.sanitize_for_serialization(
                api.list_namespaced_pod(self.namespace, label_selector=selector(labels))
            ),
        )
        names = [str(p["metadata"]["name"]) for p in found.get("items") or []]
        names = [n for n in names if n not in self._replicas]
        for name in names:
            await self._delete_pod(name, 0)
            await self._delete_secret(name)
        return names

    def owner(self) -> tuple[int, int] | None:
        """None: no file of the replica's directory reaches its pod as a file of this one
        (they go in a Secret)."""
        return None

    async def _delete_pod(self, name: str, grace: int) -> None:
        try:
            await self._call(
                f"delete replica pod {self.namespace}/{name}",
                lambda api: api.delete_namespaced_pod(
                    name, self.namespace, grace_period_seconds=grace
                ),
            )
        except _ApiError as exc:
            if exc.status != 404:  # already gone: what was wanted
                log.warning("%s", exc)

    async def _delete_replica_pod(self, replica: PodReplica) -> None:
        """The deletion a signal asked for (module docstring)."""
        assert replica.grace is not None
        replica.deleting = True
        try:
            await self._delete_pod(replica.name, replica.grace)
        finally:
            replica.deleting = False

    async def _delete_secret(self, name: str) -> None:
        try:
            await self._call(
                f"delete the Secret {self.namespace}/{name}",
                lambda api: api.delete_namespaced_secret(name, self.namespace),
            )
        except _ApiError as exc:
            if exc.status != 404:
                log.warning("%s (it goes with the host's pod)", exc)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- starting -----------------------------------------------------------------------------

    def _files(self, replica_dir: Path) -> tuple[dict[str, bytes], bool]:
        """The Secret's files: the connection file, with the pod's fixed ports and every
        address of the pod (its IP is not known before it runs), and the gateway's CA when
        there is one. Also whether it carries CURVE keys."""
        info = json.loads((replica_dir / "connection.json").read_text())
        info["ip"] = "0.0.0.0"
        info |= {k: v for k, v in KERNEL_PORTS.items() if k != "raft_port"}
        files = {"connection.json": json.dumps(info).encode()}
        ca = replica_dir / "gateway-ca.pem"
        if ca.exists():
            files["gateway-ca.pem"] = ca.read_bytes()
        return files, bool(info.get("curve_secretkey"))

    def _store(self, env: Mapping[str, str]) -> tuple[str, Mapping[str, Any]] | None:
        """The object store's directory and the daemon's volume holding it, when the store
        is a local one: the replica's pod mounts the same claim at the same path."""
        assert self.pod is not None
        store = _local_store_dir(env.get(envvars.STORE_URL.name))
        if store is None:
            return None
        held = self.pod.volume_holding(str(store))
        if held is None or "persistentVolumeClaim" not in held[1]:
            raise ContainerRuntimeError(
                f"the object store {store} is not on a PersistentVolumeClaim of the host's pod: "
                "a replica pod cannot share it (mount the store's claim in the host pod at "
                "that path, or use a Redis or S3 store)"
            )
        return held

    async def run(
        self,
        *,
        image: str,
        argv: list[str],
        env: Mapping[str, str],
        replica_dir: Path,
        kernel_id: str,
        replica_id: str,
        lifeline_fd: int,
    ) -> PodReplica:
        """Create the replica's Secret and pod; returns once the API accepted them (not once
        the pod runs: the replica reports when its pod is Ready)."""
        if self.pod is None:
            await self.check()
        assert self.pod is not None
        name = replica_pod_name(replica_id)
        labels = replica_labels(self._host, kernel_id, replica_id)
        env = dict(env)
        gpus = self._environ.get(NVIDIA_VISIBLE_DEVICES)
        if gpus and NVIDIA_VISIBLE_DEVICES not in env:
            # The GPUs the device plugin gave the host's pod (docs/kubernetes.md, "GPUs").
            env[NVIDIA_VISIBLE_DEVICES] = gpus
        try:
            files, curve = self._files(replica_dir)
        except (OSError, ValueError) as exc:
            raise ContainerRuntimeError(f"replica {replica_id}: {exc}") from None
        pod = replica_pod(
            name=name,
            owner=self.pod,
            labels=labels,
            image=image,
            argv=argv,
            env=env,
            files=sorted(files),
            user=self.user,
            store=self._store(env),
            termination_grace=self.term_grace,
        )
        secret = replica_secret(name=name, owner=self.pod, labels=labels, files=files, env=env)
        # The Secret first: the kubelet finds it when it starts the pod.
        await self._call(
            f"create the Secret {self.namespace}/{name}",
            lambda api: api.create_namespaced_secret(self.namespace, secret),
        )
        try:
            await self._call(
                f"create replica pod {self.namespace}/{name} of {image!r}",
                lambda api: api.create_namespaced_pod(self.namespace, pod),
            )
        except ContainerRuntimeError:
            await self._delete_secret(name)
            raise
        replica = PodReplica(runtime=self, name=name, replica_dir=replica_dir, curve=curve)
        self._replicas[name] = replica
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        return replica

    # -- following ----------------------------------------------------------------------------

    def _forget(self, replica: PodReplica) -> None:
        self._replicas.pop(replica.name, None)
        replica._end(replica.returncode if replica.returncode is not None else LOST)

    async def _poll(self) -> None:
        """While replicas run: list this host's replica pods and move each replica on."""
        labels = replica_labels(self._host)
        failures = 0
        while self._replicas:
            try:
                found = await self._call(
                    f"list the replica pods of host {self._host}",
                    lambda api: api.api_client.sanitize_for_serialization(
                        api.list_namespaced_pod(self.namespace, label_selector=selector(labels))
                    ),
                )
            except ContainerRuntimeError as exc:
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    log.warning("cannot follow replica pods (%d tries): %s", failures, exc)
            else:
                failures = 0
                pods = {str(p["metadata"]["name"]): p for p in found.get("items") or []}
                for replica in list(self._replicas.values()):
                    self._update(replica, pods.get(replica.name))
            now = time.monotonic()
            for replica in list(self._replicas.values()):
                if (
                    replica.returncode is None
                    and replica.give_up_at is not None
                    and now > replica.give_up_at
                ):
                    self._note(replica, "its deletion is not confirmed; counted as ended")
                    replica._end(-signal.SIGKILL)
            if self._replicas:
                await asyncio.sleep(self.poll_interval)

    def _note(self, replica: PodReplica, text: str) -> None:
        """A line in the replica's log (its tail is in the gateway's error when it fails)."""
        log.info("replica pod %s: %s", replica.name, text)
        if replica.log_path is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with contextlib.suppress(OSError), replica.log_path.open("a", encoding="utf-8") as out:
            out.write(f"{stamp} [nbcluster] pod {self.namespace}/{replica.name}: {text}\n")

    def _update(self, replica: PodReplica, pod: Mapping[str, Any] | None) -> None:
        if replica.returncode is not None:
            return
        if pod is None:
            code = -replica.signalled if replica.signalled is not None else LOST
            if replica.signalled is None:
                self._note(replica, "deleted (not by this host)")
            replica._end(code)
            return
        if (
            replica.grace is not None
            and not replica.deleting
            and not (pod.get("metadata") or {}).get("deletionTimestamp")
        ):
            # A signal's deletion did not happen (the API failed it): again.
            self._spawn(self._delete_replica_pod(replica))
        progress: PodProgress = pod_progress(pod)
        if progress.detail != replica.detail:
            replica.detail = progress.detail
            if progress.state == "failed":
                self._note(replica, f"cannot start: {progress.detail}")
            else:
                self._note(replica, progress.detail)
        if progress.started:
            replica.container_started = True
            replica.started.set()
        if progress.state == "ready" and replica.address is None:
            replica.address = progress.ip
            self._report(replica)
        elif progress.state == "failed":
            replica._end(LOST)
        elif progress.state == "exited":
            assert progress.code is not None
            replica._end(progress.code)

    def _report(self, replica: PodReplica) -> None:
        """Write the replica's port report on its report FIFO, as its process would: the
        supervisor, which holds the FIFO open for reading, takes it from there."""
        line = json.dumps(port_report(replica.curve)) + "\n"
        try:
            fd = os.open(replica.replica_dir / "report", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # the supervisor gave up on it already
            log.info("replica pod %s ready, but no one waits: %s", replica.name, exc)
            return
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def follow_logs(self, replica: PodReplica, log_path: Path) -> None:
        """Copy the kernel container's output into the replica's log file until it ends (a
        thread, once the container started)."""
        replica.log_path = log_path
        namespace = self.namespace

        def copy() -> None:
            replica.started.wait()
            if not replica.container_started:
                return  # it ended before its container started: it has no log
            try:
                response = self._client().read_namespaced_pod_log(
                    replica.name,
                    namespace,
                    container=CONTAINER,
                    follow=True,
                    _preload_content=False,
                )
                try:
                    with log_path.open("ab") as out:
                        for chunk in response.stream(4096):
                            out.write(chunk)
                            out.flush()
                finally:
                    response.release_conn()
            except Exception as exc:
                log.info("log of replica pod %s ended: %s", replica.name, describe_api_error(exc))

        threading.Thread(target=copy, name=f"logs-{replica.name}", daemon=True).start()
