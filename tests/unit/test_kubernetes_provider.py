"""The ``kubernetes`` host provider at the client seam: the official client's ``CoreV1Api``
and ``ApiClient`` as they are, with the HTTP layer (``ApiClient.rest_client``) replaced by
:class:`FakeKube`, an API server in memory that answers with the API's JSON (made from the
client's own models: ``V1Pod``, ``V1Node``, ``V1PodTemplate``), refuses a pod body the
``V1Pod`` model does not accept, and records every request. So the client's serialization and
deserialization run as against a real server; what does not run is a real API server, its
scheduler and kubelets (docs/kubernetes.md, "What was not run").

The pod template is the one deploy/kubernetes ships (components/autoscale/host-pod-template.yaml).
tests/unit/test_kubernetes_manifests.py checks the rendered manifests, the RBAC against the
requests recorded here, and the pods made here against the policies there."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client import rest

from nbcluster import envvars
from nbcluster.gateway._errors import HostProviderError
from nbcluster.gateway._kubernetes_pods import (
    GPU_RESOURCE,
    NodeRoom,
    choose_node,
    host_pod,
    node_rooms,
    pod_node,
    pod_state,
)
from nbcluster.gateway._kubernetes_provider import (
    KubernetesHostProvider,
    default_core_api,
    default_namespace,
)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_FILE = (
    ROOT / "deploy" / "kubernetes" / "components" / "autoscale" / "host-pod-template.yaml"
)
NS = "nbcluster"
GATEWAY_ID = "abc123def456"
URL = "http://nbcluster-gateway:8889"

_serialize = k8s.ApiClient().sanitize_for_serialization


# ---------------------------------------------------------------------------------------------
# The fake API server


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]

    def rbac(self) -> tuple[str, str, str, bool]:
        """(API group, resource, verb, namespaced), as the API server's authorizer sees it."""
        parts = self.path.strip("/").split("/")
        if parts[0] == "api":  # /api/v1/...: the core group
            group, rest_ = "", parts[2:]
        else:  # /apis/GROUP/VERSION/...
            group, rest_ = parts[1], parts[3:]
        namespaced = len(rest_) >= 2 and rest_[0] == "namespaces" and len(rest_) > 2
        if namespaced:
            rest_ = rest_[2:]
        resource, named = rest_[0], len(rest_) > 1
        if len(rest_) > 2:
            resource += "/" + rest_[2]
        verb = {
            ("GET", True): "get",
            ("GET", False): "watch" if self.query.get("watch") == ["true"] else "list",
            ("POST", False): "create",
            ("PUT", True): "update",
            ("PATCH", True): "patch",
            ("DELETE", True): "delete",
            ("DELETE", False): "deletecollection",
        }[(self.method, named)]
        return group, resource, verb, namespaced


class _Http:
    """What urllib3 hands the client's RESTResponse."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.reason = {200: "OK", 201: "Created"}.get(status, "Error")
        self.data = json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return _serialize(
        k8s.V1Status(
            api_version="v1",
            kind="Status",
            status="Failure",
            code=code,
            reason=reason,
            message=message,
        )
    )


def _selected(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class _Recording:
    def __init__(self, api: Any, methods: set[str]) -> None:
        self._api = api
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        if name != "api_client":
            self._methods.add(name)
        return getattr(self._api, name)


class FakeKube:
    """An API server for the calls a host provider makes (pods, nodes, pod templates)."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.nodes: list[dict[str, Any]] = []
        self.templates: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        #: (verb, resource) -> (status, reason): answered instead of doing the request.
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}
        self.threads: set[int] = set()
        self.deleted: list[tuple[str, int | None]] = []
        #: The CoreV1Api methods called.
        self.methods: set[str] = set()
        self._uid = 0

    def api(self) -> Any:
        """The real ``CoreV1Api`` on this fake's HTTP layer, recording which of its methods
        are called."""
        api_client = k8s.ApiClient(k8s.Configuration())
        api_client.rest_client = self
        return _Recording(k8s.CoreV1Api(api_client), self.methods)

    # -- the HTTP layer -----------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        headers: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> rest.RESTResponse:
        self.threads.add(threading.get_ident())
        parts = urlsplit(url)
        request = Request(method, parts.path, parse_qs(parts.query))
        self.requests.append(request)
        _, resource, verb, _ = request.rbac()
        status, answer = self._answer(request, verb, resource, body)
        response = rest.RESTResponse(_Http(status, answer))
        response.read()
        return response

    def _answer(
        self, request: Request, verb: str, resource: str, body: Any
    ) -> tuple[int, dict[str, Any]]:
        refused = self.refuse.get((verb, resource))
        if refused:
            code, reason = refused
            return code, _status(code, reason, f"{verb} {resource} refused by the test")
        name = request.path.rstrip("/").rsplit("/", 1)[-1]
        selector = (request.query.get("labelSelector") or [""])[0]
        if (verb, resource) == ("get", "podtemplates"):
            if name not in self.templates:
                return 404, _status(404, "NotFound", f'podtemplates "{name}" not found')
            return 200, self.templates[name]
        if (verb, resource) == ("list", "nodes"):
            items = [n for n in self.nodes if _selected(n["metadata"].get("labels", {}), selector)]
            return 200, _serialize(k8s.V1NodeList(items=items, metadata=k8s.V1ListMeta()))
        if (verb, resource) == ("list", "pods"):
            items = [
                p
                for p in self.pods.values()
                if _selected(p["metadata"].get("labels", {}), selector)
            ]
            return 200, _serialize(k8s.V1PodList(items=items, metadata=k8s.V1ListMeta()))
        if (verb, resource) == ("create", "pods"):
            # What the API server's decoding does first: an unknown field or a wrong type is
            # refused (the client's pydantic models are as strict).
            k8s.V1Pod.model_validate(body)
            pod = copy.deepcopy(body)
            if pod["metadata"]["name"] in self.pods:
                return 409, _status(409, "AlreadyExists", f'pods "{name}" already exists')
            self._uid += 1
            pod["metadata"].update(
                namespace=NS,
                uid=f"uid-{self._uid}",
                creationTimestamp=datetime.now(UTC).isoformat(),
            )
            pod["status"] = {"phase": "Pending"}
            self.pods[pod["metadata"]["name"]] = pod
            return 201, pod
        if (verb, resource) == ("delete", "pods"):
            if name not in self.pods:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            grace = request.query.get("gracePeriodSeconds")
            self.deleted.append((name, int(grace[0]) if grace else None))
            pod = self.pods.pop(name)
            return 200, pod
        raise AssertionError(f"the fake API server has no {request.method} {request.path}")

    # -- the cluster's side -------------------------------------------------------------------

    def calls(self) -> list[tuple[str, str]]:
        return [(r.rbac()[2], r.rbac()[1]) for r in self.requests]

    def schedule(self, name: str, phase: str = "Running", **status: Any) -> None:
        """What the scheduler and the kubelet would do to one of the pods."""
        pod = self.pods[name]
        pod["spec"]["nodeName"] = pod_node(pod)
        pod["status"] = {"phase": phase, **status}


def node(
    name: str,
    gpus: int = 8,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    taints: list[k8s.V1Taint] | None = None,
) -> dict[str, Any]:
    """A node as the API answers it (from the client's model)."""
    return dict(
        _serialize(
            k8s.V1Node(
                api_version="v1",
                kind="Node",
                metadata=k8s.V1ObjectMeta(
                    name=name,
                    labels={"kubernetes.io/hostname": name, **(labels or {})},
                ),
                spec=k8s.V1NodeSpec(unschedulable=unschedulable or None, taints=taints),
                status=k8s.V1NodeStatus(
                    allocatable={"cpu": "64", "memory": "512Gi", GPU_RESOURCE: str(gpus)},
                    conditions=[
                        k8s.V1NodeCondition(type="Ready", status="True" if ready else "False")
                    ],
                ),
            )
        )
    )


GPU_NODE = {"nvidia.com/gpu.present": "true"}
GPU_TAINT = k8s.V1Taint(key="nvidia.com/gpu", value="present", effect="NoSchedule")


def shipped_template() -> dict[str, Any]:
    """deploy/kubernetes's PodTemplate as the API would answer it (strictly loaded)."""
    raw = yaml.safe_load(TEMPLATE_FILE.read_text())
    raw["metadata"]["namespace"] = NS
    return dict(_serialize(k8s.V1PodTemplate.model_validate(raw)))


def virtual_template() -> dict[str, Any]:
    template = shipped_template()
    spec = template["template"]["spec"]
    del spec["containers"][0]["resources"]["limits"]
    del spec["nodeSelector"], spec["tolerations"]
    return template


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.templates["nbcluster-host"] = shipped_template()
    fake.nodes = [
        node("gpu-a", 8, GPU_NODE, taints=[GPU_TAINT]),
        node("gpu-b", 4, GPU_NODE, taints=[GPU_TAINT]),
        node("cpu-a", 0),
    ]
    return fake


def provider(kube: FakeKube, gpus: int = 4, **options: Any) -> KubernetesHostProvider:
    return KubernetesHostProvider(
        URL, GATEWAY_ID, gpus, namespace=NS, api=kube.api(), log_level="info", **options
    )


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["spec"]["containers"][0])


# ---------------------------------------------------------------------------------------------
# Starting hosts


async def test_start_hosts_makes_pinned_pods_from_the_template(kube: FakeKube) -> None:
    p = provider(kube, gpus=4)
    names = await p.start_hosts(2)
    assert names == ["auto-1", "auto-2"]
    assert p.started() == names and p.owns("auto-1") and not p.owns("auto-3")
    pod = kube.pods[f"nbcluster-{GATEWAY_ID}-auto-1"]
    labels = pod["metadata"]["labels"]
    assert labels["nbcluster.provider"] == "kubernetes"
    assert labels["nbcluster.gateway"] == GATEWAY_ID
    assert labels["nbcluster.host"] == "auto-1"
    assert labels["app.kubernetes.io/component"] == "host"  # the template's, kept
    c = container(pod)
    assert c["args"] == [
        "host", "--gateway", URL, "--name", "auto-1", "--address", "$(POD_IP)",
        "--log-level", "info",
    ]  # fmt: skip
    assert c["resources"]["limits"] == {GPU_RESOURCE: "4"}
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    # The join token comes from the Secret, as the template says; the provider never has it.
    token = next(e for e in c["env"] if e["name"] == envvars.JOIN_TOKEN.name)
    assert token["valueFrom"]["secretKeyRef"] == {"name": "nbcluster-join-token", "key": "token"}
    address = next(e for e in c["env"] if e["name"] == "POD_IP")
    assert address["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # The template's scheduling is kept, and the pin ANDed to it.
    assert pod["spec"]["nodeSelector"] == GPU_NODE
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The emptiest node first: one host each on gpu-a (8 GPUs) and gpu-b (4), never cpu-a.
    assert {pod_node(p_) for p_ in kube.pods.values()} == {"gpu-a", "gpu-b"}
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchFields"] == [
        {"key": "metadata.name", "operator": "In", "values": [pod_node(pod)]}
    ]
    # Each start reads the template (edits apply without a restart) and lists nodes.
    assert kube.calls().count(("get", "podtemplates")) == 1
    assert kube.calls().count(("create", "pods")) == 2


async def test_gpus_held_by_our_pods_are_counted_until_no_node_has_room(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    p = provider(kube, gpus=4)
    # gpu-a has room for 2 hosts of 4 GPUs, gpu-b for 1: 3 of the 5 asked for.
    with caplog.at_level(logging.WARNING):
        names = await p.start_hosts(5)
    assert names == ["auto-1", "auto-2", "auto-3"]
    placed = sorted(pod_node(pod) or "" for pod in kube.pods.values())
    assert placed == ["gpu-a", "gpu-a", "gpu-b"]
    assert "started 3 of 5 host pods" in caplog.text
    with pytest.raises(HostProviderError, match=r"no node has room .*2 node\(s\).*4 free nvidia"):
        await p.start_hosts(1)
    # A host stopped gives its GPUs back.
    await p.stop_host("auto-3")
    assert await p.start_hosts(1) == ["auto-4"]


async def test_nodes_the_template_does_not_fit_are_never_chosen(kube: FakeKube) -> None:
    kube.nodes = [
        node("not-ready", 8, GPU_NODE, ready=False),
        node("cordoned", 8, GPU_NODE, unschedulable=True),
        node("no-label", 8),
        node("tainted", 8, GPU_NODE, taints=[k8s.V1Taint(key="dedicated", effect="NoSchedule")]),
        node("too-small", 2, GPU_NODE),
        node("good", 8, GPU_NODE, taints=[k8s.V1Taint(key="x", effect="PreferNoSchedule")]),
    ]
    p = provider(kube, gpus=4)
    rooms = await p.nodes()
    assert rooms is not None
    assert sorted(r.name for r in rooms) == ["good", "too-small"]
    assert await p.start_hosts(3) == ["auto-1", "auto-2"]
    assert {pod_node(pod) for pod in kube.pods.values()} == {"good"}
    # The node list asked the API for the template's node selector only.
    listing = next(r for r in kube.requests if r.rbac()[1] == "nodes")
    assert listing.query["labelSelector"] == ["nvidia.com/gpu.present=true"]


async def test_virtual_gpus_when_the_template_asks_for_none(kube: FakeKube) -> None:
    kube.templates["nbcluster-host"] = virtual_template()
    kube.nodes = [node("cpu-a", 0), node("cpu-b", 0), node("gpu-a", 8, GPU_NODE)]
    p = provider(kube, gpus=2)
    assert await p.start_hosts(3) == ["auto-1", "auto-2", "auto-3"]
    pods = list(kube.pods.values())
    for pod in pods:
        c = container(pod)
        assert c["args"][-2:] == ["--gpus", "2"]
        assert GPU_RESOURCE not in (c["resources"].get("limits") or {})
    # Spread over every node, GPUs or not, the emptiest first.
    assert sorted(pod_node(pod) or "" for pod in pods) == ["cpu-a", "cpu-b", "gpu-a"]


async def test_template_args_come_after_the_providers(kube: FakeKube) -> None:
    template = kube.templates["nbcluster-host"]
    template["template"]["spec"]["containers"][0]["args"] = ["--ca=/etc/nbcluster/ca/ca.crt"]
    await provider(kube).start_hosts(1)
    args = container(next(iter(kube.pods.values())))["args"]
    assert args[:5] == ["host", "--gateway", URL, "--name", "auto-1"]
    assert args[-1] == "--ca=/etc/nbcluster/ca/ca.crt"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["env"].__setitem__(1, {"name": envvars.JOIN_TOKEN.name, "value": "nbj_x"}),
            "given as a value",
        ),
        (lambda c: c.__setitem__("env", c["env"][:1]), "no join token"),
        (lambda c: c.__setitem__("args", ["--gateway=http://elsewhere"]), "--gateway is the"),
        (lambda c: c.__setitem__("command", ["sh"]), "sets a command"),
    ],
)
async def test_a_template_that_cannot_make_working_hosts_is_refused(
    kube: FakeKube, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    change(kube.templates["nbcluster-host"]["template"]["spec"]["containers"][0])
    with pytest.raises(
        HostProviderError, match=rf"pod template nbcluster/nbcluster-host.*{message}"
    ):
        await provider(kube).start_hosts(1)
    assert kube.pods == {}


async def test_a_missing_template_is_named(kube: FakeKube) -> None:
    del kube.templates["nbcluster-host"]
    with pytest.raises(
        HostProviderError,
        match=r"read the pod template nbcluster/nbcluster-host: 404 podtemplates \"nbcluster-host\" not found",
    ):
        await provider(kube).start_hosts(1)


async def test_without_permission_to_list_nodes_the_scheduler_places_pods(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.refuse[("list", "nodes")] = (403, "Forbidden")
    p = provider(kube)
    with caplog.at_level(logging.WARNING):
        assert await p.start_hosts(2) == ["auto-1", "auto-2"]
    assert await p.nodes() is None
    assert caplog.text.count("may not list nodes") == 1  # said once, not per pod
    for pod in kube.pods.values():
        assert "affinity" not in pod["spec"]
        assert pod_node(pod) is None


async def test_refused_calls_name_what_and_why(kube: FakeKube) -> None:
    kube.refuse[("create", "pods")] = (403, "Forbidden")
    p = provider(kube)
    with pytest.raises(
        HostProviderError,
        match=r"create host pod nbcluster/nbcluster-abc123def456-auto-1: 403 create pods "
        r"refused by the test \(the gateway's service account lacks the permission",
    ):
        await p.start_hosts(1)
    assert p.started() == [] and not p.owns("auto-1")
    # The number is not tried again: a pod of that name may exist after all.
    del kube.refuse[("create", "pods")]
    assert await p.start_hosts(1) == ["auto-2"]


async def test_every_call_runs_off_the_event_loop(kube: FakeKube) -> None:
    p = provider(kube)
    await p.start_hosts(2)
    await p.stop_host("auto-1")
    await p.discover()
    assert kube.threads and threading.get_ident() not in kube.threads


# ---------------------------------------------------------------------------------------------
# Stopping, restarts, clean-up


async def test_stop_host_deletes_its_pod_with_the_grace_period(kube: FakeKube) -> None:
    p = provider(kube, stop_grace=45)
    await p.start_hosts(2)
    await p.stop_host("auto-1")
    assert kube.deleted == [(f"nbcluster-{GATEWAY_ID}-auto-1", 45)]
    assert p.started() == ["auto-2"] and not p.owns("auto-1")
    with pytest.raises(HostProviderError, match=r"host 'auto-1' was not started by the kubernetes"):
        await p.stop_host("auto-1")
    with pytest.raises(HostProviderError, match=r"host 'node-7' was not started"):
        await p.stop_host("node-7")
    # A pod someone else deleted meanwhile: stopping it is done, not an error.
    del kube.pods[f"nbcluster-{GATEWAY_ID}-auto-2"]
    await p.stop_host("auto-2")
    assert p.started() == []


async def test_a_restarted_gateway_adopts_its_pods_and_only_its_own(kube: FakeKube) -> None:
    first = provider(kube)
    await first.start_hosts(2)
    await first.close()  # stop_on_exit is off: the pods stay for the next gateway
    assert len(kube.pods) == 2 and kube.deleted == []
    other = KubernetesHostProvider(URL, "otherid1", 1, namespace=NS, api=kube.api())
    await other.start_hosts(1)
    kube.schedule(f"nbcluster-{GATEWAY_ID}-auto-1")

    second = provider(kube)
    assert await second.discover() == ["auto-1", "auto-2"]  # not the other gateway's auto-1
    assert await second.start_hosts(1) == ["auto-3"]  # names count on
    # Its GPU accounting has the adopted pods: 4 GPUs each on gpu-a (8) and gpu-b (4) ...
    # so the third went to gpu-a, and there is no room for a fourth.
    assert pod_node(kube.pods[f"nbcluster-{GATEWAY_ID}-auto-3"]) == "gpu-a"
    with pytest.raises(HostProviderError, match="no node has room"):
        await second.start_hosts(1)
    await second.close()
    assert len(kube.pods) == 4 and kube.deleted == []


async def test_ended_and_unschedulable_pods_are_deleted(kube: FakeKube) -> None:
    clock = [datetime.now(UTC).timestamp()]
    p = provider(kube, unschedulable_grace=120, clock=lambda: clock[0])
    await p.start_hosts(3)
    pods = sorted(kube.pods)
    kube.schedule(pods[0], "Failed", reason="Evicted")
    since = datetime.fromtimestamp(clock[0], UTC).isoformat()
    unschedulable = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "lastTransitionTime": since},
    ]  # fmt: skip
    kube.pods[pods[1]]["status"] = {"phase": "Pending", "conditions": unschedulable}
    assert await p.discover() == ["auto-2", "auto-3"]  # the evicted one goes at once
    assert [name for name, _ in kube.deleted] == [pods[0]]
    clock[0] += 121
    assert await p.discover() == ["auto-3"]  # the unschedulable one after its grace
    assert [name for name, _ in kube.deleted] == [pods[0], pods[1]]


async def test_close_deletes_the_pods_only_when_told(kube: FakeKube) -> None:
    p = provider(kube, stop_on_exit=True)
    await p.start_hosts(2)
    await p.close()
    assert kube.pods == {} and len(kube.deleted) == 2
    with pytest.raises(HostProviderError, match="closed"):
        await p.start_hosts(1)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="not http"):
        KubernetesHostProvider("nbcluster-gateway:8889", GATEWAY_ID, 1, namespace=NS)
    with pytest.raises(ValueError, match="cannot name a pod"):
        KubernetesHostProvider(URL, GATEWAY_ID, 1, namespace=NS, name_prefix="GPU_")
    with pytest.raises(ValueError, match="gpus_per_host"):
        KubernetesHostProvider(URL, GATEWAY_ID, -1, namespace=NS)


def test_default_namespace(tmp_path: Path) -> None:
    path = tmp_path / "namespace"
    assert default_namespace(path) == "default"
    path.write_text("research\n")
    assert default_namespace(path) == "research"


# ---------------------------------------------------------------------------------------------
# The pure part


def _pod(node_name: str | None, gpus: int, phase: str = "Running", **meta: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "host", "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}]
    }
    if node_name:
        spec["nodeName"] = node_name
    return {"metadata": {"name": "p", **meta}, "spec": spec, "status": {"phase": phase}}


def test_node_rooms_subtract_live_pods_only() -> None:
    spec = shipped_template()["template"]["spec"]
    nodes = [node("a", 8, GPU_NODE, taints=[GPU_TAINT]), node("b", 8, GPU_NODE)]
    pods = [_pod("a", 4), _pod("a", 2), _pod("b", 8, "Failed"), _pod(None, 1, "Pending")]
    rooms = {r.name: r for r in node_rooms(nodes, pods, spec)}
    assert rooms["a"] == NodeRoom("a", 8, 2, 2)
    assert rooms["b"] == NodeRoom("b", 8, 8, 0)


def test_choose_node_prefers_the_emptiest() -> None:
    rooms = [NodeRoom("a", 8, 8, 0), NodeRoom("b", 8, 4, 1), NodeRoom("c", 4, 4, 0)]
    assert choose_node(rooms, 4) == rooms[0]  # fewest hosts, then most free GPUs
    assert choose_node(rooms, 6) == rooms[0]
    assert choose_node(rooms[1:], 6) is None
    assert choose_node(rooms[1:], None) == rooms[2]


@pytest.mark.parametrize(
    ("toleration", "tolerated"),
    [
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists"}, True),
        ({"operator": "Exists"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, True),
        ({"key": "nvidia.com/gpu", "value": "absent"}, False),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "other", "operator": "Exists"}, False),
    ],
)
def test_tolerations_follow_kubernetes(toleration: dict[str, str], tolerated: bool) -> None:
    spec = {"containers": [{"name": "host"}], "tolerations": [toleration]}
    rooms = node_rooms([node("a", 8, taints=[GPU_TAINT])], [], spec)
    assert bool(rooms) is tolerated


def test_required_node_affinity_is_evaluated_and_kept() -> None:
    template = shipped_template()
    spec = template["template"]["spec"]
    spec["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]},
                    {"matchExpressions": [{"key": "mem", "operator": "Gt", "values": ["500"]}]},
                ]
            }
        }
    }
    nodes = [
        node("a100", 8, {**GPU_NODE, "gpu": "a100"}, taints=[GPU_TAINT]),
        node("big", 8, {**GPU_NODE, "mem": "768"}),
        node("t4", 8, {**GPU_NODE, "gpu": "t4", "mem": "64"}),
    ]
    assert sorted(r.name for r in node_rooms(nodes, [], spec)) == ["a100", "big"]
    pod = host_pod(
        template, pod_name="p", labels={}, gateway_url=URL, host_name="h", log_level="info",
        gpus=1, node="big",
    )  # fmt: skip
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    pin = {"key": "metadata.name", "operator": "In", "values": ["big"]}
    # Either term of the template, and in both the pinned node.
    assert [t["matchFields"] for t in terms["nodeSelectorTerms"]] == [[pin], [pin]]
    assert (
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0].get("matchFields")
        is None
    )  # the template itself is not changed


def test_pod_state() -> None:
    now = datetime.now(UTC)
    old = (now - timedelta(seconds=300)).isoformat()
    assert pod_state(_pod("a", 1), now.timestamp(), 120) == "live"
    assert pod_state(_pod("a", 1, "Failed"), now.timestamp(), 120) == "ended"
    assert pod_state(_pod("a", 1, "Succeeded"), now.timestamp(), 120) == "ended"
    stopping = _pod("a", 1, deletionTimestamp=now.isoformat())
    assert pod_state(stopping, now.timestamp(), 120) == "stopping"
    stuck = _pod(None, 1, "Pending")
    stuck["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "lastTransitionTime": old},
    ]  # fmt: skip
    assert pod_state(stuck, now.timestamp(), 120) == "stuck"
    assert pod_state(stuck, now.timestamp(), 600) == "live"


# ---------------------------------------------------------------------------------------------
# One run through every call the provider makes (also used by test_kubernetes_manifests.py
# to derive the RBAC rules it needs)


async def exercise_provider(kube: FakeKube) -> KubernetesHostProvider:
    """Start, adopt, clean up, refuse and stop: every path that calls the API."""
    p = provider(kube, stop_on_exit=True, unschedulable_grace=0)
    await p.start_hosts(2)
    first = sorted(kube.pods)[0]
    kube.schedule(first, "Failed", reason="Evicted")
    again = provider(kube, stop_on_exit=True)
    await again.discover()
    await again.start_hosts(1)
    await again.stop_host(again.started()[0])
    await again.close()
    return again


def api_methods_named() -> set[str]:
    """The client methods the provider's source calls (``api.<method>``)."""
    import ast

    import nbcluster.gateway._kubernetes_provider as module

    source = ast.parse(Path(module.__file__).read_text())
    return {
        n.attr
        for n in ast.walk(source)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "api"
        and n.attr != "api_client"
    }


async def test_the_exercise_calls_every_api_method_the_provider_uses(kube: FakeKube) -> None:
    """The RBAC test trusts :func:`exercise_provider` to reach every call: each client method
    the provider's source names must be among those it called."""
    named = api_methods_named()
    assert "create_namespaced_pod" in named and len(named) >= 5  # the scan sees the calls
    await exercise_provider(kube)
    assert kube.methods == named


def run_exercise() -> Iterator[Request]:
    """:func:`exercise_provider` on a fresh fake; its requests."""
    kube = FakeKube()
    kube.templates["nbcluster-host"] = shipped_template()
    kube.nodes = [node("gpu-a", 8, GPU_NODE, taints=[GPU_TAINT])]
    asyncio.run(exercise_provider(kube))
    return iter(kube.requests)


def test_the_default_client_comes_from_the_kube_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(HostProviderError, match="no Kubernetes API to talk to: not in a cluster"):
        default_core_api()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://10.9.8.7:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "config").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    api = default_core_api()
    assert api.api_client.configuration.host == "https://10.9.8.7:6443"
    # Its own configuration: the client's global default is left alone.
    assert k8s.Configuration.get_default_copy().host != "https://10.9.8.7:6443"


def test_container_host_options_are_refused_with_kubernetes(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            *(sys.executable, "-m", "nbcluster", "gateway", "--hosts-from", "kubernetes"),
            *("--host-image", "x:1", "--max-hosts", "2", "--state-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--host-image has no meaning with --hosts-from kubernetes" in result.stderr
