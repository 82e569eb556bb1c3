"""deploy/kubernetes: every overlay rendered with ``kubectl kustomize`` (offline) and every
object loaded strictly with the official client's models, then what the objects must say to
each other and to nbcluster: references that resolve, Pod Security, command lines the real CLI
accepts, NetworkPolicies that admit exactly the gateway and the hosts, the RBAC the host
provider's calls need (derived from a run of the provider, not listed twice), and the gateway's
probe against a real gateway started the way the Deployment starts it.

Without kubectl these tests skip, or fail where ``NBCLUSTER_TEST_REQUIRE_KUBECTL=1`` (CI)."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from kubernetes import client as k8s
from pydantic import ValidationError

from nbcluster import envvars
from nbcluster.cli import cli
from nbcluster.host._kube_replicas import NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV

from ..cluster import free_port, wait_for
from ..tls_files import make_tls_files
from .test_kube_replicas import run_exercise as run_replica_exercise
from .test_kubernetes_provider import (
    GATEWAY_ID,
    GPU_NODE,
    FakeKube,
    Request,
    node,
    provider,
    run_exercise,
    shipped_template,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
#: The base and every overlay (rendered each on its own).
OVERLAYS = ["base", *sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())]
NAMESPACE = "nbcluster"
#: Overlays whose gateway runs the kubernetes host provider.
AUTOSCALED = [o for o in OVERLAYS if o in ("autoscale", "production", "try")]
#: Overlays whose host daemons run kernel images as pods (components/kernel-pods).
KERNEL_PODS = [o for o in OVERLAYS if o in ("kernel-pods",)]

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Rendering and strict loading


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl is not installed (Debian: apt-get install kubernetes-client)"
        if os.environ.get("NBCLUSTER_TEST_REQUIRE_KUBECTL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _kustomize(overlay: str) -> tuple[Obj, ...]:
    where = DEPLOY / ("base" if overlay == "base" else f"overlays/{overlay}")
    result = subprocess.run(
        [_kubectl(), "kustomize", str(where)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@functools.cache
def _rendered() -> dict[str, tuple[Obj, ...]]:
    """Every overlay, rendered at once (kubectl takes a few tenths of a second each)."""
    _kubectl()
    with ThreadPoolExecutor(len(OVERLAYS)) as pool:
        return dict(zip(OVERLAYS, pool.map(_kustomize, OVERLAYS), strict=True))


def render(overlay: str) -> list[Obj]:
    """The overlay's objects (copies: tests may change them)."""
    return copy.deepcopy(list(_rendered()[overlay]))


def _api_class(api_version: str) -> str:
    """The client's API class serving ``api_version``: ``v1`` → CoreV1Api, ``apps/v1`` →
    AppsV1Api, ``rbac.authorization.k8s.io/v1`` → RbacAuthorizationV1Api."""
    group, _, version = api_version.rpartition("/")
    name = "".join(p.capitalize() for p in group.removesuffix(".k8s.io").split(".") if p)
    return f"{name or 'Core'}{version.capitalize()}Api"


def load(obj: Obj) -> tuple[Any, bool]:
    """``obj`` as the client's model (pydantic, ``extra="forbid"``, strict types): an unknown
    field or a wrong type raises. Also checks that ``apiVersion`` serves ``kind``. Returns the
    model and whether the kind is namespaced."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    version = api_version.rpartition("/")[2]
    model = getattr(k8s, f"{version.capitalize()}{kind}", None)
    api = getattr(k8s, _api_class(api_version), None)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    namespaced = api is not None and hasattr(api, f"create_namespaced_{snake}")
    if model is None or api is None or not (namespaced or hasattr(api, f"create_{snake}")):
        raise ValueError(f"{kind!r} is not a kind of {api_version!r}")
    return model.model_validate(obj), namespaced


def named(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = named(objects, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name}"
    return found[0]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj, Obj]]:
    """(what, pod metadata, pod spec) of every workload and pod template."""
    for o in objects:
        what = f"{o['kind']} {o['metadata']['name']}"
        if o["kind"] == "PodTemplate":
            yield what, o["template"].get("metadata") or {}, o["template"]["spec"]
        elif o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            template = o["spec"]["template"]
            yield what, template.get("metadata") or {}, template["spec"]
        elif o["kind"] == "Pod":
            yield what, o["metadata"], o["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_loads_strictly(overlay: str) -> None:
    objects = render(overlay)
    assert objects
    names = set()
    for obj in objects:
        what = f"overlays/{overlay}: {obj.get('kind')} {obj['metadata'].get('name')}"
        try:
            _, namespaced = load(obj)
        except (ValidationError, ValueError) as exc:
            pytest.fail(f"{what}: {exc}")
        # Namespaced objects in the namespace; cluster-scoped ones without one.
        expected = NAMESPACE if namespaced else None
        assert obj["metadata"].get("namespace") == expected, what
        assert (obj["kind"], obj["metadata"]["name"]) not in names, f"{what} twice"
        names.add((obj["kind"], obj["metadata"]["name"]))
    assert one(objects, "Namespace", NAMESPACE)


def test_the_strict_loading_refuses_broken_objects() -> None:
    deployment = one(render("production"), "Deployment", "nbcluster-gateway")
    load(deployment)  # as rendered: loads

    def broken(path: str, value: Any) -> Obj:
        obj = copy.deepcopy(deployment)
        *parents, last = path.split(".")
        target: Any = obj
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
        return obj

    container = "spec.template.spec.containers.0"
    for path, value, error in [
        (f"{container}.imagePullPolcy", "Always", "Extra inputs are not permitted"),
        (f"{container}.ports.0.containerPort", "8889", "valid integer"),
        (f"{container}.resources.limits", {"memory": 4}, "valid string"),
        (f"{container}.args", "gateway --ip 0.0.0.0", "valid list"),
        ("spec.replicas", "1", "valid integer"),
        ("spec.strategy.rollingUpdates", {}, "Extra inputs"),
        ("metadata.labels", {"app": True}, "valid string"),
    ]:
        with pytest.raises(ValidationError, match=error):
            load(broken(path, value))
    with pytest.raises(ValueError, match=r"'Deployment' is not a kind of 'v1'"):
        load({**deployment, "apiVersion": "v1"})
    with pytest.raises(ValueError, match=r"'Deploymnet' is not a kind of 'apps/v1'"):
        load({**deployment, "kind": "Deploymnet"})
    role = one(render("autoscale"), "Role", "nbcluster-host-provider")
    _, namespaced = load(role)
    assert namespaced
    assert not load(one(render("autoscale"), "ClusterRole", "nbcluster-host-provider-nodes"))[1]


# ---------------------------------------------------------------------------------------------
# References between objects


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str) -> None:
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    for what, _, spec in pod_specs(objects):
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            assert claim is None or ("PersistentVolumeClaim", claim) in kinds, f"{what}: {claim}"
            secret = (v.get("secret") or {}).get("secretName")
            # The operator creates the Secrets: docs/kubernetes.md must say how.
            assert secret is None or f"`{secret}`" in documented, f"{what}: Secret {secret}"
        account = spec.get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) in kinds, f"{what}: {account}"
        for c in spec["containers"]:
            for mount in c.get("volumeMounts") or []:
                assert mount["name"] in volumes, f"{what}: mount of {mount['name']}"
            env = {e["name"]: e for e in c.get("env") or []}
            for e in env.values():
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                assert ref is None or f"`{ref['name']}`" in documented, f"{what}: {ref}"
            # $(VAR) in args is expanded from the container's env; an undefined one would
            # reach nbcluster as the literal text.
            for arg in c.get("args") or []:
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in env, f"{what}: {arg} names no variable of the container"
    for service in named(objects, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            (w, s)
            for w, m, s in pod_specs(objects)
            if selector.items() <= (m.get("labels") or {}).items()
        ]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {pods}"
        ports = {
            p["name"]: p["containerPort"]
            for c in pods[0][1]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"]
    for binding in named(objects, "RoleBinding") + named(objects, "ClusterRoleBinding"):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in kinds
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["name"]) in kinds
            assert subject.get("namespace", NAMESPACE) == NAMESPACE


def test_the_gateway_is_a_single_recreated_replica_on_its_volume() -> None:
    for overlay in OVERLAYS:
        deployment = one(render(overlay), "Deployment", "nbcluster-gateway")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        claims = {(v.get("persistentVolumeClaim") or {}).get("claimName") for v in volumes}
        assert "nbcluster-gateway-state" in claims, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_ingress_speaks_the_gateways_protocol(overlay: str) -> None:
    objects = render(overlay)
    args = one(objects, "Deployment", "nbcluster-gateway")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    https = any(a.startswith("--certfile=") for a in args)
    for ingress in named(objects, "Ingress"):
        annotations = ingress["metadata"].get("annotations") or {}
        protocol = annotations.get("nginx.ingress.kubernetes.io/backend-protocol", "HTTP")
        assert protocol == ("HTTPS" if https else "HTTP"), overlay


def test_the_pod_template_is_the_daemonsets_pod() -> None:
    """The auto-scaler's host pods and the DaemonSet's are the same pod, but for what each
    adds: the DaemonSet names hosts after their node and gives the gateway's URL in args; the
    provider adds both itself."""
    daemonset = one(render("nvidia-runtime"), "DaemonSet", "nbcluster-host")
    template = one(render("autoscale"), "PodTemplate", "nbcluster-host")
    pod = copy.deepcopy(daemonset["spec"]["template"])
    pod["spec"].pop("runtimeClassName")  # from the component, not the base
    for c in pod["spec"]["containers"]:
        c.pop("args")
        c["env"] = [e for e in c["env"] if e["name"] not in ("GATEWAY_URL", "NODE_NAME")]
    expected = copy.deepcopy(template["template"])
    expected["spec"].pop("restartPolicy")  # a DaemonSet's pods always restart
    assert pod == expected


# ---------------------------------------------------------------------------------------------
# Security


_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
_SECRET_NAMES = re.compile(r"TOKEN|PASSWORD|SECRET|KEY")


def check_pod_security(what: str, spec: Obj, level: str) -> None:
    """Pod Security Standards ``restricted`` (what the namespace enforces), and nbcluster's
    own rules at every level: non-root, no secret values in the spec."""
    pod_context = spec.get("securityContext") or {}
    assert pod_context.get("runAsNonRoot") is True, what
    for c in spec["containers"] + spec.get("initContainers", []):
        context = {**pod_context, **(c.get("securityContext") or {})}
        name = f"{what} container {c['name']}"
        if c["image"].startswith("nbcluster"):
            assert context.get("runAsUser") == 1000, name  # the image's user
        for e in c.get("env") or []:
            assert not (_SECRET_NAMES.search(e["name"]) and "value" in e), f"{name}: {e['name']}"
        for arg in (c.get("args") or []) + (c.get("command") or []):
            assert not re.search(r"--(join-)?token=|nb[ujk]_", str(arg)), f"{name}: {arg}"
        if level != "restricted":
            continue
        assert context.get("allowPrivilegeEscalation") is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert not c["securityContext"]["capabilities"].get("add"), name
        assert (context.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        assert not context.get("privileged"), name
    if level == "restricted":
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{what}: {key}"
        for v in spec.get("volumes") or []:
            assert set(v) - {"name"} <= _RESTRICTED_VOLUMES, f"{what}: volume {v}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_namespaces_pod_security(overlay: str) -> None:
    objects = render(overlay)
    level = one(objects, "Namespace", NAMESPACE)["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"
    ]
    assert level == ("privileged" if overlay == "host-network" else "restricted")
    for what, _, spec in pod_specs(objects):
        check_pod_security(what, spec, level)
        assert spec.get("automountServiceAccountToken") is (
            (what == "Deployment nbcluster-gateway" and overlay in AUTOSCALED)
            or (what == "DaemonSet nbcluster-host" and overlay in KERNEL_PODS)
        ), f"{what}: only the auto-scaling gateway and hosts running kernel pods call the API"
        assert spec.get("enableServiceLinks") is False, what
    gateway = one(objects, "Deployment", "nbcluster-gateway")["spec"]["template"]["spec"]
    assert gateway["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    for redis in named(objects, "Deployment"):
        if "redis" in redis["metadata"]["name"]:
            context = redis["spec"]["template"]["spec"]["containers"][0]["securityContext"]
            assert context["readOnlyRootFilesystem"] is True


def test_the_security_check_fails_on_insecure_pods() -> None:
    _, _, spec = next(pod_specs(named(render("production"), "Deployment", "nbcluster-gateway")))
    check_pod_security("gateway", spec, "restricted")
    for change in [
        lambda s: s["securityContext"].pop("runAsNonRoot"),
        lambda s: s["containers"][0]["securityContext"].__setitem__(
            "allowPrivilegeEscalation", True
        ),
        lambda s: s["containers"][0]["securityContext"]["capabilities"].__setitem__(
            "add", ["NET_ADMIN"]
        ),
        lambda s: s.__setitem__("hostNetwork", True),
        lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda s: s["containers"][0]["env"].append({"name": "NBCLUSTER_TOKEN", "value": "x"}),
        lambda s: s["containers"][0]["args"].append("--token=abc"),
        lambda s: s["securityContext"].__setitem__("runAsUser", 0),
    ]:
        insecure = copy.deepcopy(spec)
        change(insecure)
        with pytest.raises(AssertionError):
            check_pod_security("gateway", insecure, "restricted")


# ---------------------------------------------------------------------------------------------
# Command lines


def _commands() -> dict[str, click.Command]:
    assert isinstance(cli, click.Group)
    return dict(cli.commands)


def check_command_line(args: list[str], env: dict[str, str]) -> None:
    """``nbcluster ARGS`` as the container runs it: a known subcommand, known options, and
    values its types accept (files are not looked for: they are in the pod)."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in args]
    command = _commands()[expanded[0]]
    options = {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts}
    ctx = click.Context(command)
    rest = expanded[1:]
    while rest:
        arg = rest.pop(0)
        name, has_value, value = arg.partition("=")
        assert name in options, f"nbcluster {expanded[0]} has no option {name}"
        param = options[name]
        if param.is_flag:
            assert not has_value, arg
            continue
        if not has_value:
            value = rest.pop(0)
        if not isinstance(param.type, click.Path):
            param.type.convert(value, param, ctx)  # raises click.BadParameter


def _env(container: Obj) -> dict[str, str]:
    return {
        e["name"]: e.get("value", f"<{e['name']} from the pod>") for e in container.get("env", [])
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_command_lines_are_ones_nbcluster_accepts(overlay: str) -> None:
    objects = render(overlay)
    gateway = one(objects, "Deployment", "nbcluster-gateway")["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    check_command_line(container["args"], _env(container))
    for daemonset in named(objects, "DaemonSet"):
        host = daemonset["spec"]["template"]["spec"]["containers"][0]
        check_command_line(host["args"], _env(host))


def test_the_command_line_check_refuses_what_nbcluster_would() -> None:
    check_command_line(["host", "--gateway=http://g:8889", "--gpus=2", "--name", "n"], {})
    for args, error in [
        (["host", "--gatway=http://g:8889"], "has no option --gatway"),
        (["host", "--gpus=two"], "not a valid integer"),
        (["gateway", "--policy=fifo"], "fifo"),
        (["gateway", "--replicas=2"], "2"),
    ]:
        with pytest.raises((AssertionError, click.BadParameter), match=error):
            check_command_line(args, {})


# ---------------------------------------------------------------------------------------------
# NetworkPolicies


def _admits(policy: Obj, labels: dict[str, str]) -> bool:
    """Whether some ingress rule of ``policy`` admits pods labelled ``labels`` (a rule with
    no ``from`` admits everyone)."""
    for rule in policy["spec"].get("ingress") or []:
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            wanted = (peer.get("podSelector") or {}).get("matchLabels")
            if wanted is not None and wanted.items() <= labels.items():
                return True
    return False


def _selects(policy: Obj, labels: dict[str, str]) -> bool:
    return bool(policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items())


async def _provider_pod_labels() -> dict[str, str]:
    kube = FakeKube()
    kube.templates["nbcluster-host"] = shipped_template()
    kube.nodes = [node("gpu-a", 8, GPU_NODE)]
    await provider(kube).start_hosts(1)
    pod = next(iter(kube.pods.values()))
    assert pod["metadata"]["labels"]["nbcluster.gateway"] == GATEWAY_ID
    return dict(pod["metadata"]["labels"])


async def test_the_host_providers_pods_pass_the_same_checks() -> None:
    """A pod the provider makes from the shipped template: a valid ``V1Pod`` (the fake API
    server loads it strictly), Pod Security ``restricted``, and a command line ``nbcluster
    host`` accepts."""
    kube = FakeKube()
    kube.templates["nbcluster-host"] = shipped_template()
    kube.nodes = [node("gpu-a", 8, GPU_NODE)]
    await provider(kube).start_hosts(1)
    pod = next(iter(kube.pods.values()))
    load(pod)
    check_pod_security("the provider's pod", pod["spec"], "restricted")
    host = pod["spec"]["containers"][0]
    check_command_line(host["args"], _env(host))
    assert host["args"][0] == "host" and "--address" in host["args"]


@functools.cache
def _replica_exercise() -> tuple[tuple[Any, ...], tuple[Obj, ...]]:
    """The requests of a replica pod's life and the pods made (test_kube_replicas), once; on
    a thread of its own (it runs an event loop, and async tests ask for it too)."""
    with tempfile.TemporaryDirectory() as where, ThreadPoolExecutor(1) as pool:
        requests, pods = pool.submit(run_replica_exercise, Path(where)).result()
    return tuple(requests), tuple(pods)


def test_replica_pods_load_strictly_and_meet_pod_security() -> None:
    """The pods the kubernetes replica runtime makes: a valid ``V1Pod``, Pod Security
    ``restricted`` (what the namespace enforces) and nbcluster's own rules (no secret values
    in env or args)."""
    (pod,) = copy.deepcopy(_replica_exercise()[1])
    load(pod)
    check_pod_security("a replica pod", pod["spec"], "restricted")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_only_the_gateway_and_hosts_reach_replica_ports(overlay: str) -> None:
    objects = render(overlay)
    policies = named(objects, "NetworkPolicy")
    pods = {what: meta.get("labels") or {} for what, meta, _ in pod_specs(objects)}
    if overlay in AUTOSCALED:
        pods["a pod of the host provider"] = await _provider_pod_labels()
    kernel = dict(_replica_exercise()[1][0]["metadata"]["labels"])
    if overlay in KERNEL_PODS:
        # Not named "host": hosts' replica ports are not for them.
        pods["a kernel pod of the replica runtime"] = kernel
        governing = [p for p in policies if _selects(p, kernel) and p["spec"]["podSelector"]]
        assert [p["metadata"]["name"] for p in governing] == ["nbcluster-kernel"]
        for other, other_labels in pods.items():
            should = other == "a kernel pod of the replica runtime" or (
                other == "Deployment nbcluster-gateway"
            )
            assert _admits(governing[0], other_labels) == should, f"kernel pods from {other}"
        ports = governing[0]["spec"]["ingress"][0]["ports"]
        assert ports == [{"port": 5555, "endPort": 5560, "protocol": "TCP"}]
    else:
        assert not named(objects, "NetworkPolicy", "nbcluster-kernel"), overlay
    default_deny = one(objects, "NetworkPolicy", "nbcluster-default-deny")
    assert default_deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    gateway = pods["Deployment nbcluster-gateway"]
    hosts = {w: labels for w, labels in pods.items() if "host" in w}
    assert hosts, "no host pods"
    for what, labels in hosts.items():
        governing = [p for p in policies if _selects(p, labels) and p["spec"]["podSelector"]]
        if overlay == "host-network":
            # Policies do not apply to host-network pods: none pretends to.
            assert governing == [], what
            continue
        assert [p["metadata"]["name"] for p in governing] == ["nbcluster-host"], what
        for other, other_labels in pods.items():
            admitted = _admits(governing[0], other_labels)
            should = other_labels is gateway or other in hosts
            assert admitted == should, f"{what} from {other}: {admitted}"
    for name, allowed in [("nbcluster-redis-jobs", {"gateway"}), ("nbcluster-redis-store", None)]:
        if not named(objects, "NetworkPolicy", name):
            continue
        policy = one(objects, "NetworkPolicy", name)
        for other, other_labels in pods.items():
            expected = other_labels is gateway or (allowed is None and other in hosts)
            assert _admits(policy, other_labels) == expected, f"{name} from {other}"
    port = one(objects, "NetworkPolicy", "nbcluster-gateway")["spec"]["ingress"][0]["ports"]
    assert port == [{"port": 8889, "protocol": "TCP"}]


# ---------------------------------------------------------------------------------------------
# RBAC: exactly what the provider calls


def _rules(objects: list[Obj], kind: str) -> set[tuple[str, str, str]]:
    found = set()
    for role in named(objects, kind):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb), f"{kind}: a wildcard"
                        found.add((group, resource, verb))
    return found


def _needed(requests: Iterator[Request]) -> tuple[set[tuple[str, str, str]], ...]:
    namespaced, cluster = set(), set()
    for request in requests:
        group, resource, verb, in_namespace = request.rbac()
        (namespaced if in_namespace else cluster).add((group, resource, verb))
    return namespaced, cluster


@pytest.mark.parametrize("overlay", AUTOSCALED)
def test_rbac_is_exactly_what_the_host_provider_calls(overlay: str) -> None:
    objects = render(overlay)
    namespaced, cluster = _needed(run_exercise())
    assert ("", "pods", "create") in namespaced and ("", "nodes", "list") in cluster
    assert _rules(objects, "Role") == namespaced, "the Role differs from the provider's calls"
    assert _rules(objects, "ClusterRole") == cluster, "the ClusterRole differs from its calls"
    account = one(objects, "Deployment", "nbcluster-gateway")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    for binding in named(objects, "RoleBinding") + named(objects, "ClusterRoleBinding"):
        assert [s["name"] for s in binding["subjects"]] == [account]


def test_no_rbac_without_the_provider() -> None:
    for overlay in set(OVERLAYS) - set(AUTOSCALED) - set(KERNEL_PODS):
        objects = render(overlay)
        assert not [o for o in objects if "Role" in o["kind"]], overlay


@pytest.mark.parametrize("overlay", KERNEL_PODS)
def test_rbac_is_exactly_what_the_replica_runtime_calls(overlay: str) -> None:
    """components/kernel-pods' Role against the requests of a replica pod's life (start-up,
    leftovers, start, log, follow, stop), bound to the hosts' service account only; the
    gateway's provider RBAC is not there."""
    objects = render(overlay)
    namespaced, cluster = _needed(iter(_replica_exercise()[0]))
    assert ("", "secrets", "create") in namespaced and ("", "pods/log", "get") in namespaced
    assert not cluster, "the replica runtime calls nothing cluster-scoped"
    assert not any(verb in ("get", "list", "watch") for _, r, verb in namespaced if r == "secrets")
    assert _rules(objects, "Role") == namespaced, "the Role differs from the runtime's calls"
    assert not named(objects, "ClusterRole")
    account = one(objects, "DaemonSet", "nbcluster-host")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    for binding in named(objects, "RoleBinding"):
        assert binding["roleRef"]["name"] == "nbcluster-kernel-pods"
        assert [s["name"] for s in binding["subjects"]] == [account]
    # The host daemon finds its own pod with these (docs/kubernetes.md).
    host = one(objects, "DaemonSet", "nbcluster-host")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in host["env"]}
    for name, path in [
        (NAMESPACE_ENV, "metadata.namespace"),
        (POD_NAME_ENV, "metadata.name"),
        (POD_UID_ENV, "metadata.uid"),
    ]:
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert "--container-runtime=kubernetes" in host["args"]


def test_the_rbac_comparison_sees_a_missing_or_extra_rule() -> None:
    objects = render("autoscale")
    namespaced, _ = _needed(run_exercise())
    role = one(objects, "Role", "nbcluster-host-provider")
    role["rules"][0]["verbs"].remove("delete")
    assert _rules(objects, "Role") != namespaced
    role["rules"][0]["verbs"] += ["delete", "get"]
    assert _rules(objects, "Role") != namespaced


# ---------------------------------------------------------------------------------------------
# The gateway as the Deployment starts it, and its probe


def _remap(text: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        text = text.replace(inside, str(outside))
    return text


@pytest.mark.parametrize("overlay", ["base", "tls"])
def test_the_probe_passes_on_the_gateway_as_deployed_and_fails_with_a_wrong_token(
    overlay: str, tmp_path: Path
) -> None:
    """The Deployment's gateway command line and environment, run here with its volumes mapped
    to directories, HOME and the working directory not writable (as the read-only root file
    system leaves them; moot when the tests run as root); then its probe command, as the
    kubelet runs it. With TLS, the certificate names the Service only, as in a cluster."""
    objects = render(overlay)
    spec = one(objects, "Deployment", "nbcluster-gateway")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    port = free_port()
    paths = {
        "/var/lib/nbcluster-store": tmp_path / "store",
        "/var/lib/nbcluster": tmp_path / "state",
        "/etc/nbcluster/admin-token/token": tmp_path / "admin-token",
        "/etc/nbcluster/join-token/token": tmp_path / "join-token",
        "8889": str(port),
    }
    tls = make_tls_files(tmp_path / "tls", ("nbcluster-gateway",))
    paths |= {
        "/etc/nbcluster/tls/tls.crt": tls.cert,
        "/etc/nbcluster/tls/tls.key": tls.key,
        "/etc/nbcluster/tls/ca.crt": tls.ca,
    }
    for d in ("store", "state", "tmp", "home"):
        (tmp_path / d).mkdir()
    (tmp_path / "admin-token").write_text("admin-token-for-the-probe\n")
    (tmp_path / "join-token").write_text("nbj_join-token-for-the-probe\n")
    (tmp_path / "home").chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith(envvars.PREFIX) and k != "HOME"}
    env |= {e["name"]: _remap(e["value"], paths) for e in container["env"]}
    env |= {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    args = [
        _remap(re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a), paths) for a in container["args"]
    ]
    nbcluster = Path(sys.executable).with_name("nbcluster")
    gateway = subprocess.Popen(
        [str(nbcluster), *args],
        cwd=tmp_path / "home",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe == container["livenessProbe"]["exec"]["command"]
    assert probe[0] == "python3"
    command = [sys.executable, *[_remap(a, paths) for a in probe[1:]]]

    def answers() -> bool:
        assert gateway.poll() is None, f"the gateway exited: {gateway.communicate()[0]}"
        return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode == 0

    assert ("--certfile=/etc/nbcluster/tls/tls.crt" in container["args"]) == (overlay == "tls")
    try:
        wait_for(answers, 30, "the gateway's probe to pass")
        (tmp_path / "admin-token").write_text("not-the-admin-token\n")
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
        assert refused.returncode != 0 and "HTTP Error 403" in refused.stderr
    finally:
        gateway.send_signal(signal.SIGTERM)
        output = gateway.communicate(timeout=20)[0]
    assert "Traceback" not in output and "Read-only file system" not in output, output
