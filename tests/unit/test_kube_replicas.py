"""Kernel replicas as pods (``--container-runtime kubernetes``) at the client seam: the official
client's ``CoreV1Api`` as it is, with its HTTP layer replaced by :class:`FakeKube`, an API
server in memory that answers with the API's JSON (made from the client's models), refuses a
pod or Secret the ``V1Pod``/``V1Secret`` models do not accept, and records every request.
The cluster's side (the scheduler, the kubelet) is played by the tests, which move pods'
status as they would. What does not run is a real API server, scheduler, kubelet and image
(docs/kubernetes.md, "What was not run").

tests/unit/test_kubernetes_manifests.py checks the RBAC of components/kernel-pods against the
requests :func:`run_exercise` makes here, and the pods made here against Pod Security."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
import zmq
from kubernetes import client as k8s
from kubernetes.client import rest

from nbcluster import envvars
from nbcluster.host._containers import ContainerRuntimeError
from nbcluster.host._kube_replica_pods import (
    KERNEL_PORTS,
    MOUNT,
    SelfPod,
    is_secret_env,
    label_value,
    pod_progress,
    replica_pod_name,
)
from nbcluster.host._kube_replicas import (
    NAMESPACE_ENV,
    POD_NAME_ENV,
    POD_UID_ENV,
    KubernetesReplicaRuntime,
    PodReplica,
)
from nbcluster.host._processes import ReplicaStartError, ReplicaSupervisor
from nbcluster.hostproto import ReplicaExited, StartReplica

from .test_kubernetes_provider import Request

ROOT = Path(__file__).resolve().parents[2]
HOSTS_FILE = ROOT / "deploy" / "kubernetes" / "base" / "hosts.yaml"
NS = "nbcluster"
HOST_POD = "nbcluster-host-x7k2p"
HOST_UID = "0b6c3a1e-host-pod-uid"
NODE = "gpu-a"
IMAGE = "registry.example/kernels/torch:2.4"
ENVIRON = {
    NAMESPACE_ENV: NS,
    POD_NAME_ENV: HOST_POD,
    POD_UID_ENV: HOST_UID,
    "NVIDIA_VISIBLE_DEVICES": "GPU-1111,GPU-2222",
}

_serialize = k8s.ApiClient().sanitize_for_serialization


# ---------------------------------------------------------------------------------------------
# The fake API server


class _Http:
    """What urllib3 hands the client (and, unread, the caller of a streamed log)."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.reason = {200: "OK", 201: "Created"}.get(status, "Error")
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()
        kind = "text/plain" if isinstance(body, bytes) else "application/json"
        self.headers = {"content-type": kind}
        self.released = False

    def stream(self, amount: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), amount):
            yield self.data[i : i + amount]

    def release_conn(self) -> None:
        self.released = True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return dict(
        _serialize(
            k8s.V1Status(
                api_version="v1", kind="Status", status="Failure", code=code, reason=reason,
                message=message,
            )
        )
    )  # fmt: skip


def host_pod() -> dict[str, Any]:
    """The daemon's own pod: the DaemonSet's pod of deploy/kubernetes, as the API answers it."""
    daemonset = next(
        d for d in yaml.safe_load_all(HOSTS_FILE.read_text()) if d["kind"] == "DaemonSet"
    )
    template = daemonset["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": HOST_POD, "namespace": NS, "uid": HOST_UID},
        "spec": {**template["spec"], "nodeName": NODE, "runtimeClassName": "nvidia"},
        "status": {"phase": "Running", "podIP": "10.1.0.5"},
    }
    return dict(_serialize(k8s.V1Pod.model_validate(pod)))


class FakeKube:
    """An API server for the calls the replica runtime makes."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {HOST_POD: host_pod()}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.deleted: list[tuple[str, str, int | None]] = []
        #: (verb, resource) -> (status, reason): answered instead of doing the request.
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}
        self.lock = threading.Lock()
        self._uid = 0

    def api(self) -> Any:
        api_client = k8s.ApiClient(k8s.Configuration())
        api_client.rest_client = self
        return k8s.CoreV1Api(api_client)

    def request(
        self,
        method: str,
        url: str,
        headers: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        parts = urlsplit(url)
        request = Request(method, parts.path, parse_qs(parts.query))
        with self.lock:
            self.requests.append(request)
            _, resource, verb, _ = request.rbac()
            status, answer = self._answer(request, verb, resource, body)
        response = rest.RESTResponse(_Http(status, answer))
        if resource != "pods/log" or status != 200:
            response.read()  # a streamed log is read by the caller, from ``.response``
        return response

    def _answer(self, request: Request, verb: str, resource: str, body: Any) -> tuple[int, Any]:
        refused = self.refuse.get((verb, resource))
        if refused:
            code, reason = refused
            return code, _status(code, reason, f"{verb} {resource} refused by the test")
        parts = request.path.rstrip("/").split("/")
        name = parts[-2] if resource == "pods/log" else parts[-1]
        store = self.secrets if resource == "secrets" else self.pods
        if (verb, resource) == ("get", "pods/log"):
            return 200, self.logs.get(name, b"")
        if verb == "get":
            if name not in store:
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            return 200, store[name]
        if (verb, resource) == ("list", "pods"):
            wanted = dict(
                t.split("=")
                for t in (request.query.get("labelSelector") or [""])[0].split(",")
                if t
            )
            items = [
                p
                for p in self.pods.values()
                if wanted.items() <= p["metadata"].get("labels", {}).items()
            ]
            return 200, _serialize(k8s.V1PodList(items=items, metadata=k8s.V1ListMeta()))
        if verb == "create":
            model = k8s.V1Pod if resource == "pods" else k8s.V1Secret
            model.model_validate(body)  # the API server's strict decoding
            obj = copy.deepcopy(body)
            if obj["metadata"]["name"] in store:
                return 409, _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            self._uid += 1
            obj["metadata"].update(namespace=NS, uid=f"uid-{self._uid}")
            if resource == "pods":
                obj["status"] = {"phase": "Pending"}
            store[obj["metadata"]["name"]] = obj
            return 201, obj
        if verb == "delete":
            if name not in store:
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            grace = request.query.get("gracePeriodSeconds")
            self.deleted.append((resource, name, int(grace[0]) if grace else None))
            return 200, store.pop(name)
        raise AssertionError(f"the fake API server has no {request.method} {request.path}")

    # -- the cluster's side -------------------------------------------------------------------

    def calls(self) -> list[tuple[str, str]]:
        return [(r.rbac()[2], r.rbac()[1]) for r in self.requests]

    def replica_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods.values() if p["metadata"]["name"] != HOST_POD]

    def move(self, name: str, status: k8s.V1PodStatus) -> None:
        """What the scheduler and the kubelet would do to a pod (its status, from the model)."""
        with self.lock:
            self.pods[name]["status"] = _serialize(status)


def running(ip: str = "10.1.7.9", ready: bool = True) -> k8s.V1PodStatus:
    return k8s.V1PodStatus(
        phase="Running",
        pod_ip=ip,
        conditions=[
            k8s.V1PodCondition(type="PodScheduled", status="True"),
            k8s.V1PodCondition(type="Ready", status="True" if ready else "False"),
        ],
        container_statuses=[
            k8s.V1ContainerStatus(
                name="kernel", image=IMAGE, image_id="", ready=ready, restart_count=0,
                state=k8s.V1ContainerState(running=k8s.V1ContainerStateRunning()),
            )
        ],
    )  # fmt: skip


def waiting(reason: str, message: str) -> k8s.V1PodStatus:
    return k8s.V1PodStatus(
        phase="Pending",
        conditions=[k8s.V1PodCondition(type="PodScheduled", status="True")],
        container_statuses=[
            k8s.V1ContainerStatus(
                name="kernel", image=IMAGE, image_id="", ready=False, restart_count=0,
                state=k8s.V1ContainerState(
                    waiting=k8s.V1ContainerStateWaiting(reason=reason, message=message)
                ),
            )
        ],
    )  # fmt: skip


def terminated(code: int, phase: str = "Failed") -> k8s.V1PodStatus:
    return k8s.V1PodStatus(
        phase=phase,
        pod_ip="10.1.7.9",
        container_statuses=[
            k8s.V1ContainerStatus(
                name="kernel", image=IMAGE, image_id="", ready=False, restart_count=0,
                state=k8s.V1ContainerState(
                    terminated=k8s.V1ContainerStateTerminated(exit_code=code, reason="Error")
                ),
            )
        ],
    )  # fmt: skip


def unschedulable(message: str) -> k8s.V1PodStatus:
    return k8s.V1PodStatus(
        phase="Pending",
        conditions=[
            k8s.V1PodCondition(
                type="PodScheduled", status="False", reason="Unschedulable", message=message
            )
        ],
    )


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


def runtime(kube: FakeKube, **options: Any) -> KubernetesReplicaRuntime:
    return KubernetesReplicaRuntime(
        "gpu-a", api=kube.api(), environ=ENVIRON, poll_interval=0.01, **options
    )


def supervisor(
    tmp_path: Path, containers: KubernetesReplicaRuntime
) -> tuple[ReplicaSupervisor, list[ReplicaExited]]:
    exits: list[ReplicaExited] = []

    async def on_exit(event: ReplicaExited) -> None:
        exits.append(event)

    return (
        ReplicaSupervisor(
            address="10.1.0.5",
            run_dir=tmp_path / "run",
            log_dir=tmp_path / "logs",
            default_working_dir=tmp_path,
            on_exit=on_exit,
            gateway_env={envvars.GATEWAY_URL.name: "http://nbcluster-gateway:8889"},
            containers=containers,
        ),
        exits,
    )


def start_request(replica_id: str = "r1a2b3", curve: bool = True, **fields: Any) -> StartReplica:
    return StartReplica(
        request_id="q1",
        kernel_id="k-0f3e",
        replica_id=replica_id,
        argv=["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
        env={
            envvars.RAFT_PASSWORD.name: "raft-password-xyz",
            envvars.GATEWAY_TOKEN.name: "nbk_kernel-token-xyz",
            envvars.STORE_URL.name: "file:///var/lib/nbcluster-store",
            "CUDA_VISIBLE_DEVICES": "0",
            "MY_SETTING": "plain",
        },
        key="hmac-key-xyz",
        launch_timeout=fields.pop("launch_timeout", 5.0),
        curve_secretkey=zmq.curve_keypair()[1].decode() if curve else None,
        image=IMAGE,
        **fields,
    )


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def started(
    tmp_path: Path, kube: FakeKube, request: StartReplica | None = None
) -> tuple[ReplicaSupervisor, list[ReplicaExited], Any, str]:
    """A replica pod started through the supervisor, made Ready by the test."""
    containers = runtime(kube)
    await containers.check()
    sup, exits = supervisor(tmp_path, containers)
    request = request or start_request()
    task = asyncio.create_task(sup.start(request))
    name = replica_pod_name(request.replica_id)
    await until(lambda: name in kube.pods)
    kube.logs[name] = b"kernel says hello\n"
    kube.move(name, running())
    replica = await asyncio.wait_for(task, 5)
    return sup, exits, replica, name


# ---------------------------------------------------------------------------------------------
# The pod and its Secret


async def test_a_replica_pod_is_pinned_owned_labelled_and_locked_down(
    tmp_path: Path, kube: FakeKube
) -> None:
    sup, _, _, name = await started(tmp_path, kube)
    pod = kube.pods[name]
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "nbcluster",
        "app.kubernetes.io/component": "kernel",
        "nbcluster.role": "replica",
        "nbcluster.host": "gpu-a",
        "nbcluster.kernel": "k-0f3e",
        "nbcluster.replica": "r1a2b3",
    }
    # Kubernetes deletes it with its host's pod.
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1", "kind": "Pod", "name": HOST_POD, "uid": HOST_UID,
            "blockOwnerDeletion": False, "controller": False,
        }
    ]  # fmt: skip
    # On the daemon's node (through the scheduler), with the host pod's tolerations and
    # runtime class.
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE]}]}
    ]
    assert spec["tolerations"] == kube.pods[HOST_POD]["spec"]["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["shareProcessNamespace"] is True
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["image"] == IMAGE
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    # The kernelspec's argv, its connection file in the Secret's mount.
    assert container["command"] == [
        "python", "-m", "nbcluster.kernel", "-f", f"{MOUNT}/connection.json",
    ]  # fmt: skip
    assert "resources" not in container  # no nvidia.com/gpu: the host's pod holds them
    assert {p["containerPort"] for p in container["ports"]} == set(KERNEL_PORTS.values())
    assert container["readinessProbe"]["tcpSocket"] == {"port": KERNEL_PORTS["hb_port"]}
    # The Secret, mounted read-only, mode 0400; the store's claim at the same path.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["nbcluster"]["secret"]["secretName"] == name
    assert volumes["nbcluster"]["secret"]["defaultMode"] == 0o400
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "nbcluster-store"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["nbcluster"] == {"name": "nbcluster", "mountPath": MOUNT, "readOnly": True}
    assert mounts["store"]["mountPath"] == "/var/lib/nbcluster-store"
    await sup.stop_all()


async def test_no_secret_is_in_the_pods_spec(tmp_path: Path, kube: FakeKube) -> None:
    request = start_request()
    sup, _, _, name = await started(tmp_path, kube, request)
    text = json.dumps(kube.pods[name])
    assert request.curve_secretkey is not None
    secrets = ["hmac-key-xyz", "raft-password-xyz", "nbk_kernel-token-xyz"]
    for secret in [*secrets, request.curve_secretkey, "file:///var/lib/nbcluster-store"]:
        assert secret not in text
    env = {e["name"]: e for e in kube.pods[name]["spec"]["containers"][0]["env"]}
    for variable in (
        envvars.RAFT_PASSWORD.name,
        envvars.GATEWAY_TOKEN.name,
        envvars.STORE_URL.name,
    ):
        assert env[variable] == {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": name, "key": f"env.{variable}"}},
        }
    assert env["MY_SETTING"] == {"name": "MY_SETTING", "value": "plain"}
    assert env["CUDA_VISIBLE_DEVICES"]["value"] == "0"
    # The host pod's GPUs (the device plugin's), for the NVIDIA runtime.
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "GPU-1111,GPU-2222"
    # The FIFOs of the Docker runtime do not cross pods.
    assert envvars.REPORT_PATH.name not in env and envvars.LIFELINE_PATH.name not in env
    # The Secret holds them: the connection file with the fixed ports on every address.
    secret = kube.secrets[name]
    assert secret["immutable"] is True
    assert secret["metadata"]["ownerReferences"][0]["uid"] == HOST_UID
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data[f"env.{envvars.RAFT_PASSWORD.name}"] == "raft-password-xyz"
    connection = json.loads(data["connection.json"])
    assert connection["key"] == "hmac-key-xyz"
    assert connection["curve_secretkey"] == request.curve_secretkey
    assert connection["ip"] == "0.0.0.0"
    assert connection["shell_port"] == KERNEL_PORTS["shell_port"]
    assert connection["hb_port"] == KERNEL_PORTS["hb_port"]
    # The Secret is made before the pod (the kubelet finds it when it starts the pod).
    creates = [c for c in kube.calls() if c[0] == "create"]
    assert creates == [("create", "secrets"), ("create", "pods")]
    await sup.stop_all()


async def test_running_ready_pod_reports_its_ip_and_fixed_ports(
    tmp_path: Path, kube: FakeKube
) -> None:
    sup, _, replica, _ = await started(tmp_path, kube)
    c = replica.connection
    assert c.ip == "10.1.7.9"  # the pod's, not the host's 10.1.0.5
    assert (c.shell_port, c.iopub_port, c.stdin_port, c.control_port, c.hb_port) == (
        5555, 5556, 5557, 5558, 5559,
    )  # fmt: skip
    assert c.raft_port == 5560
    assert c.curve_publickey is not None
    assert replica.pid == 0
    # The kernel's log is copied into the replica's log.
    await until(lambda: b"kernel says hello" in replica.log_path.read_bytes())
    assert ("get", "pods/log") in kube.calls()
    await sup.stop_all()


async def test_a_pod_running_but_not_ready_has_not_reported(tmp_path: Path, kube: FakeKube) -> None:
    containers = runtime(kube)
    await containers.check()
    sup, _ = supervisor(tmp_path, containers)
    task = asyncio.create_task(sup.start(start_request()))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    kube.move(name, running(ready=False))
    await asyncio.sleep(0.2)
    assert not task.done()
    kube.move(name, running(ip="10.1.7.10"))
    replica = await asyncio.wait_for(task, 5)
    assert replica.connection.ip == "10.1.7.10"
    await sup.stop_all()


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (waiting("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'), "ImagePullBackOff"),
        (
            unschedulable("0/3 nodes are available: 1 Insufficient memory."),
            "Unschedulable: 0/3 nodes are available: 1 Insufficient memory.",
        ),
        (
            waiting("CreateContainerConfigError", 'secret "x" not found'),
            "CreateContainerConfigError",
        ),
        (
            k8s.V1PodStatus(phase="Failed", reason="OutOfcpu", message="Node didn't have enough"),
            "Failed: OutOfcpu: Node didn't have enough",
        ),
    ],
)
async def test_a_pod_that_cannot_start_fails_naming_the_pod_and_reason(
    tmp_path: Path, kube: FakeKube, status: k8s.V1PodStatus, reason: str
) -> None:
    containers = runtime(kube)
    await containers.check()
    sup, exits = supervisor(tmp_path, containers)
    task = asyncio.create_task(sup.start(start_request(launch_timeout=30)))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    kube.move(name, status)
    with pytest.raises(ReplicaStartError) as failed:
        await asyncio.wait_for(task, 5)
    message = str(failed.value)
    assert f"pod {NS}/{name}: cannot start: {reason}" in message
    # Nothing is left: not the pod, not its Secret, not the connection file.
    assert name not in kube.pods and name not in kube.secrets
    assert not (tmp_path / "run" / "r1a2b3").exists()
    assert not sup.replicas and not exits
    # Its log was never asked for (it has none).
    assert ("get", "pods/log") not in kube.calls()


async def test_a_pod_that_stays_pending_times_out_with_its_state(
    tmp_path: Path, kube: FakeKube
) -> None:
    containers = runtime(kube)
    await containers.check()
    sup, _ = supervisor(tmp_path, containers)
    task = asyncio.create_task(sup.start(start_request(launch_timeout=0.5)))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    kube.move(name, waiting("ContainerCreating", ""))
    with pytest.raises(ReplicaStartError) as failed:
        await asyncio.wait_for(task, 5)
    assert "did not report its ports within 0 s" in str(failed.value)
    assert f"pod {NS}/{name}: ContainerCreating" in str(failed.value)
    assert ("pods", name, 0) in kube.deleted and name not in kube.secrets


async def test_the_api_refusing_the_pod_is_a_start_error_and_removes_the_secret(
    tmp_path: Path, kube: FakeKube
) -> None:
    kube.refuse[("create", "pods")] = (403, "Forbidden")
    containers = runtime(kube)
    await containers.check()
    sup, _ = supervisor(tmp_path, containers)
    with pytest.raises(
        ReplicaStartError, match=r"create replica pod .* 403 .*components/kernel-pods"
    ):
        await sup.start(start_request())
    assert not kube.secrets


# ---------------------------------------------------------------------------------------------
# Exit codes and signals


async def test_the_exit_code_comes_from_the_containers_state(
    tmp_path: Path, kube: FakeKube
) -> None:
    sup, exits, _, name = await started(tmp_path, kube)
    kube.move(name, terminated(3))
    await until(lambda: bool(exits))
    assert exits[0].exit_code == 3 and not exits[0].requested
    assert exits[0].replica_id == "r1a2b3"
    # Released: its pod and Secret deleted, the replica forgotten.
    assert name not in kube.pods and name not in kube.secrets
    assert not sup.replicas


async def test_term_deletes_with_grace_and_kill_at_once(tmp_path: Path, kube: FakeKube) -> None:
    sup, exits, replica, name = await started(tmp_path, kube)
    handle = replica.process
    assert isinstance(handle, PodReplica)
    # The fake deletes at once; the kubelet would end the container after SIGTERM: the test
    # keeps the pod and says how the container ended.
    kube.refuse[("delete", "pods")] = (409, "Conflict")
    sup.signal("r1a2b3", signal.SIGTERM)
    await until(lambda: any(r.method == "DELETE" for r in kube.requests))
    delete = next(r for r in kube.requests if r.method == "DELETE")
    assert delete.query["gracePeriodSeconds"] == ["30"]
    kube.move(name, terminated(143))
    assert await asyncio.wait_for(handle.wait(), 5) == 143
    del kube.refuse[("delete", "pods")]
    await until(lambda: bool(exits))
    assert exits[0].exit_code == 143

    sup2, exits2, _, name2 = await started(tmp_path / "b", kube, start_request("r9"))
    code = await sup2.stop("r9", grace=0)  # no SIGTERM: SIGKILL, a deletion at once
    assert ("pods", name2, 0) in kube.deleted
    assert code == -signal.SIGKILL
    assert exits2[0].requested


async def test_stop_with_grace_sends_term_then_kill(tmp_path: Path, kube: FakeKube) -> None:
    sup, exits, _, _ = await started(tmp_path, kube)
    # The pod outlives SIGTERM's deletion, and the API fails the SIGKILL's deletion for a
    # while: the poller asks again until it happens.
    kube.refuse[("delete", "pods")] = (503, "ServiceUnavailable")
    stopping = asyncio.create_task(sup.stop("r1a2b3", grace=0.2))
    await asyncio.sleep(0.4)
    del kube.refuse[("delete", "pods")]
    code = await asyncio.wait_for(stopping, 10)
    graces = [r.query.get("gracePeriodSeconds") for r in kube.requests if r.method == "DELETE"]
    assert graces[0] == ["30"] and ["0"] in graces
    assert code == -signal.SIGKILL
    assert exits[0].requested


async def test_a_kill_the_api_never_confirms_does_not_hang_the_stop(
    tmp_path: Path, kube: FakeKube
) -> None:
    containers = runtime(kube, kill_timeout=0.3)
    await containers.check()
    sup, exits = supervisor(tmp_path, containers)
    task = asyncio.create_task(sup.start(start_request()))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    kube.move(name, running())
    await asyncio.wait_for(task, 5)
    kube.refuse[("delete", "pods")] = (503, "ServiceUnavailable")
    code = await asyncio.wait_for(sup.stop("r1a2b3", grace=0), 5)
    assert code == -signal.SIGKILL
    assert exits[0].requested and not sup.replicas
    deletes = [r for r in kube.requests if r.method == "DELETE" and "pods" in r.path]
    assert len(deletes) > 1, "the deletion is asked again while it fails"


async def test_sigint_is_not_delivered_and_says_why(
    tmp_path: Path, kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    sup, _, replica, name = await started(tmp_path, kube)
    with caplog.at_level(logging.WARNING):
        sup.signal("r1a2b3", signal.SIGINT)
    assert "Kubernetes has no signal API" in caplog.text
    assert '"interrupt_mode": "message"' in caplog.text
    await asyncio.sleep(0.05)
    assert name in kube.pods and replica.process.returncode is None
    await sup.stop_all()


async def test_a_pod_deleted_by_someone_else_is_an_exit(tmp_path: Path, kube: FakeKube) -> None:
    _, exits, _, name = await started(tmp_path, kube)
    with kube.lock:
        del kube.pods[name]
    await until(lambda: bool(exits))
    assert exits[0].exit_code == -1
    assert "deleted (not by this host)" in exits[0].log_tail


# ---------------------------------------------------------------------------------------------
# The daemon's pod, restarts, leftovers


async def test_leftovers_of_an_earlier_run_are_deleted_by_label(
    tmp_path: Path, kube: FakeKube
) -> None:
    first = runtime(kube)
    await first.check()
    sup, _ = supervisor(tmp_path, first)
    task = asyncio.create_task(sup.start(start_request()))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    task.cancel()  # the daemon dies here: its pod and Secret stay
    with pytest.raises(asyncio.CancelledError):
        await task
    other = runtime(kube)
    other._host = "gpu-b"  # another host's replicas in the namespace are not ours
    await other.check()
    assert await other.remove_leftovers() == []
    second = runtime(kube)
    await second.check()
    assert await second.remove_leftovers() == [name]
    assert name not in kube.pods and name not in kube.secrets
    assert HOST_POD in kube.pods
    listing = next(r for r in kube.requests if r.rbac()[2] == "list")
    assert listing.query["labelSelector"] == ["nbcluster.host=gpu-a,nbcluster.role=replica"]


async def test_check_needs_the_downward_api_and_the_pod_it_names(kube: FakeKube) -> None:
    for missing in (NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV):
        environ = {k: v for k, v in ENVIRON.items() if k != missing}
        r = KubernetesReplicaRuntime("gpu-a", api=kube.api(), environ=environ)
        with pytest.raises(ContainerRuntimeError, match=f"{missing} is not set"):
            await r.check()
    r = KubernetesReplicaRuntime("gpu-a", api=kube.api(), environ={**ENVIRON, POD_UID_ENV: "x"})
    with pytest.raises(ContainerRuntimeError, match="a pod of that name replaced this one"):
        await r.check()
    kube.refuse[("get", "pods")] = (403, "Forbidden")
    with pytest.raises(ContainerRuntimeError, match=r"403 .*components/kernel-pods"):
        await runtime(kube).check()


def test_the_container_user_must_be_a_numeric_non_root_uid() -> None:
    assert KubernetesReplicaRuntime("h", container_user="2000:3000").user == (2000, 3000)
    assert KubernetesReplicaRuntime("h").user == (1000, 1000)
    for user in ("0:0", "nbcluster", "1000:staff"):
        with pytest.raises(ValueError, match="numeric uid:gid"):
            KubernetesReplicaRuntime("h", container_user=user)


async def test_a_store_not_on_a_claim_is_refused(tmp_path: Path, kube: FakeKube) -> None:
    containers = runtime(kube)
    await containers.check()
    sup, _ = supervisor(tmp_path, containers)
    request = start_request()
    request.env[envvars.STORE_URL.name] = "file:///srv/elsewhere"
    with pytest.raises(ReplicaStartError, match="not on a PersistentVolumeClaim"):
        await sup.start(request)
    assert not kube.replica_pods() and not kube.secrets
    # A network store needs no volume.
    request = start_request("r2")
    request.env[envvars.STORE_URL.name] = "redis://nbcluster-redis:6379/0"
    task = asyncio.create_task(sup.start(request))
    await until(lambda: bool(kube.replica_pods()))
    pod = kube.replica_pods()[0]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["nbcluster"]
    kube.move(pod["metadata"]["name"], running())
    await asyncio.wait_for(task, 5)
    await sup.stop_all()


# ---------------------------------------------------------------------------------------------
# The pure part


def test_names_and_labels_are_valid_for_the_api() -> None:
    assert replica_pod_name("r1a2b3") == "nbcluster-replica-r1a2b3"
    long = replica_pod_name("R_" + "x" * 80)
    assert len(long) <= 63 and long.startswith("nbcluster-replica-r-x")
    assert replica_pod_name("R_" + "x" * 80) != replica_pod_name("R_" + "x" * 81)
    assert label_value("gpu-a") == "gpu-a"
    node = "ip-10-0-1-1." + "a" * 60 + ".compute.internal"
    assert label_value(node).startswith("h-") and len(label_value(node)) <= 63
    assert label_value(node) == label_value(node)
    for name in ("NBCLUSTER_RAFT_PASSWORD", "NBCLUSTER_GATEWAY_TOKEN", "AWS_SECRET_ACCESS_KEY",
                 "NBCLUSTER_STORE_URL", "HF_TOKEN"):  # fmt: skip
        assert is_secret_env(name), name
    assert not is_secret_env("CUDA_VISIBLE_DEVICES")


def test_pod_progress_reads_the_apis_shapes() -> None:
    def pod(status: k8s.V1PodStatus) -> dict[str, Any]:
        return {"status": _serialize(status)}

    assert pod_progress({}).state == "starting"
    assert pod_progress(pod(waiting("ErrImagePull", "x"))).state == "starting"  # retried
    assert pod_progress(pod(waiting("ImagePullBackOff", "x"))).state == "failed"
    ready = pod_progress(pod(running("10.2.3.4")))
    assert (ready.state, ready.ip, ready.started) == ("ready", "10.2.3.4", True)
    assert pod_progress(pod(running(ready=False))).detail == "Running, not ready"
    ended = pod_progress(pod(terminated(0, "Succeeded")))
    assert (ended.state, ended.code) == ("exited", 0)


def test_the_self_pod_finds_the_volume_under_a_path() -> None:
    me = SelfPod.from_pod(host_pod(), container="host")
    assert (me.namespace, me.name, me.uid, me.node) == (NS, HOST_POD, HOST_UID, NODE)
    held = me.volume_holding("/var/lib/nbcluster-store/objects")
    assert held is not None and held[0] == "/var/lib/nbcluster-store"
    assert me.volume_holding("/var/lib/nbcluster-storex") is None


# ---------------------------------------------------------------------------------------------
# For tests/unit/test_kubernetes_manifests.py: every call the runtime makes


async def _exercise(tmp_path: Path) -> tuple[FakeKube, list[dict[str, Any]]]:
    kube = FakeKube()
    containers = runtime(kube)
    await containers.check()
    await containers.remove_leftovers()
    sup, _ = supervisor(tmp_path, containers)
    task = asyncio.create_task(sup.start(start_request()))
    name = replica_pod_name("r1a2b3")
    await until(lambda: name in kube.pods)
    pods = [copy.deepcopy(kube.pods[name])]
    kube.move(name, running())
    await asyncio.wait_for(task, 5)
    await until(lambda: ("get", "pods/log") in kube.calls())
    await sup.stop("r1a2b3", grace=0.05)
    return kube, pods


def run_exercise(tmp_path: Path) -> tuple[list[Request], list[dict[str, Any]]]:
    """Every request the runtime makes in a replica's life (start-up, leftovers, start, log,
    follow, stop), and the replica pods it made."""
    kube, pods = asyncio.run(_exercise(tmp_path))
    return list(kube.requests), pods


def test_the_exercise_makes_every_kind_of_call(tmp_path: Path) -> None:
    requests, pods = run_exercise(tmp_path)
    calls = {(r.rbac()[2], r.rbac()[1]) for r in requests}
    assert calls == {
        ("get", "pods"), ("list", "pods"), ("create", "secrets"), ("create", "pods"),
        ("get", "pods/log"), ("delete", "pods"), ("delete", "secrets"),
    }  # fmt: skip
    assert all(r.rbac()[3] for r in requests), "every call is in the namespace"
    assert len(pods) == 1


# ---------------------------------------------------------------------------------------------
# The daemon and its command line


def test_the_daemon_runs_replica_pods_with_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbcluster.host import HostConfig, HostDaemon, HostRejected

    def config(**fields: Any) -> HostConfig:
        return HostConfig(
            gateway_url="http://127.0.0.1:9",
            token="nbj_x",
            name="gpu-a",
            state_dir=tmp_path,
            virtual_gpus=1,
            container_runtime="kubernetes",
            **fields,
        )

    daemon = HostDaemon(config())
    assert isinstance(daemon.containers, KubernetesReplicaRuntime)
    with pytest.raises(HostRejected, match="numeric uid:gid"):
        HostDaemon(config(container_user="nbcluster"))
    # Not in a pod: the daemon stops at start-up, naming what is missing.
    for name in (NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HostRejected, match=f"--container-runtime kubernetes: {NAMESPACE_ENV}"):
        asyncio.run(daemon.run())


def test_the_command_line_takes_the_runtime() -> None:
    from click.testing import CliRunner

    from nbcluster.cli import cli

    result = CliRunner().invoke(cli, ["host", "--help"])
    assert "kubernetes" in result.output
    args = ["host", "--gateway", "http://g:8889", "--container-runtime", "podman"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "'docker', 'kubernetes'" in result.output
