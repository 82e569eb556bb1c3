"""Host daemons as Kubernetes pods (``nbcluster gateway --hosts-from kubernetes``), one pod per
host, made from the operator's ``PodTemplate`` (``_kubernetes_pods``; docs/kubernetes.md).

**Why pods, not a StatefulSet.** Scaling a StatefulSet down ends its highest ordinal, and the
auto-scaler must stop the *idle* host it chose (a busy one holds replicas and bound GPUs): one
pod per host makes every start and stop exact. ``restartPolicy: Always`` makes the kubelet
restart a daemon that dies, under the same pod and host name.

**Placement.** For each new host the provider lists the nodes the template fits (ready,
schedulable, node selector, taints, required node affinity), subtracts the GPUs its own pods
hold from each node's ``status.allocatable["nvidia.com/gpu"]``, and pins the pod to the node
with the fewest of its hosts that has ``gpus_per_host`` free (a ``metadata.name`` field term in
the pod's node affinity, as the DaemonSet controller does: the scheduler still checks
resources and taints). Listing nodes needs a ClusterRole; without it (403) pods are left to the
scheduler, with a warning. A pod that stays unschedulable (GPUs taken by other workloads) for
``unschedulable_grace`` seconds, and a pod that ended (evicted), are deleted at the next scale
out or discovery.

**A restarted gateway** finds its pods by label (``nbcluster.provider=kubernetes``,
``nbcluster.gateway=<gateway id>``; :meth:`discover`), owns them and counts names on. Pods
outlive the gateway unless ``stop_on_exit``: their daemons reconnect to the new one.

Calls (the gateway's RBAC, ``deploy/kubernetes/components/autoscale/rbac.yaml``, allows these
and no more; a test derives the rules from them): ``read_namespaced_pod_template``,
``list_node``, ``list_namespaced_pod``, ``create_namespaced_pod``, ``delete_namespaced_pod``.
Every call is blocking and runs in a worker thread. The join token never passes through the
provider: the template takes it from a Secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .._kube_api import KubeConfigMissing, api_status, describe_api_error, new_core_api
from ._container_hosts import LABEL_HOST, host_number
from ._errors import HostProviderError
from ._kubernetes_pods import (
    GPU_RESOURCE,
    NodeRoom,
    check_pod_name,
    check_template,
    choose_node,
    host_labels,
    host_pod,
    label_selector,
    node_rooms,
    pod_state,
    uses_gpus,
)

__all__ = ["KubernetesHostProvider", "default_core_api", "default_namespace"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where a pod finds its own namespace (the service account's files).
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(path: Path = _NAMESPACE_FILE) -> str:
    """The gateway pod's own namespace; ``default`` outside a cluster (where the kube config's
    context does not count: name the namespace)."""
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def default_core_api() -> Any:
    """A ``CoreV1Api`` on its own configuration (see ``_kube_api.new_core_api``)."""
    try:
        return new_core_api()
    except KubeConfigMissing as exc:
        raise HostProviderError(str(exc)) from exc


class KubernetesHostProvider:
    """Host daemons as pods in ``namespace`` made from the ``PodTemplate`` called
    ``pod_template`` (module docstring).

    ``gateway_url``: the URL host pods reach the gateway at (``--public-url``, e.g. the
    Service's ``http://nbcluster-gateway:8889``). ``gateway_id``: this gateway's id, in its
    pods' labels and names (``_container_hosts.provider_id``). ``gpus_per_host``: the
    ``nvidia.com/gpu`` of each pod when the template asks for GPUs, else its virtual GPUs.
    ``api``: a ``kubernetes.client.CoreV1Api`` (default: :func:`default_core_api`, made at the
    first call)."""

    name = "kubernetes"

    def __init__(
        self,
        gateway_url: str,
        gateway_id: str,
        gpus_per_host: int,
        *,
        pod_template: str = "nbcluster-host",
        namespace: str | None = None,
        name_prefix: str = "auto",
        log_level: str = "info",
        stop_on_exit: bool = False,
        stop_grace: float = 30.0,
        unschedulable_grace: float = 120.0,
        api: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL {gateway_url!r} is not http(s)")
        if gpus_per_host < 0:
            raise ValueError(f"gpus_per_host must be 0 or more, not {gpus_per_host}")
        if stop_grace < 0:
            raise ValueError(f"stop_grace must be 0 or more, not {stop_grace}")
        check_pod_name(f"nbcluster-{gateway_id}-{name_prefix}-1")
        self.gateway_url = gateway_url
        self.gateway_id = gateway_id
        self.gpus_per_host = gpus_per_host
        self.pod_template = pod_template
        self.namespace = namespace or default_namespace()
        self.name_prefix = name_prefix
        self.log_level = log_level
        self.stop_on_exit = stop_on_exit
        self.stop_grace = stop_grace
        self.unschedulable_grace = unschedulable_grace
        self._api = api
        # Worker threads make the default client on first use: one of them.
        self._api_lock = threading.Lock()
        self._clock = clock
        #: Host name -> its pod (JSON), as last listed or created.
        self._pods: dict[str, dict[str, Any]] = {}
        self._next = 1
        self._discovered = False
        self._nodes_forbidden = False
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"KubernetesHostProvider(namespace={self.namespace!r}, "
            f"template={self.pod_template!r}, gateway={self.gateway_id!r}, "
            f"hosts={sorted(self._pods)!r})"
        )

    def pod_name(self, name: str) -> str:
        return f"nbcluster-{self.gateway_id}-{name}"

    # -- calls ----------------------------------------------------------------------------------

    async def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """``call(api)`` in a worker thread; the client's errors become a
        :class:`HostProviderError` naming ``what`` was being done."""

        def run() -> T:
            with self._api_lock:
                if self._api is None:
                    self._api = default_core_api()
            return call(self._api)

        try:
            return await asyncio.to_thread(run)
        except HostProviderError:
            raise
        except Exception as exc:
            # The client raises ApiException, urllib3's errors and pydantic's; all mean the
            # call did not happen as asked.
            hint = ""
            if api_status(exc) == 403:
                hint = (
                    " (the gateway's service account lacks the permission: apply "
                    "deploy/kubernetes/components/autoscale's RBAC)"
                )
            raise HostProviderError(f"{what}: {describe_api_error(exc)}{hint}") from exc

    async def _list_pods(self) -> list[dict[str, Any]]:
        selector = label_selector(host_labels(self.gateway_id))
        found = await self._call(
            f"list host pods in namespace {self.namespace}",
            lambda api: api.api_client.sanitize_for_serialization(
                api.list_namespaced_pod(self.namespace, label_selector=selector)
            ),
        )
        return list(found.get("items") or [])

    async def _template(self) -> dict[str, Any]:
        template: dict[str, Any] = await self._call(
            f"read the pod template {self.namespace}/{self.pod_template}",
            lambda api: api.api_client.sanitize_for_serialization(
                api.read_namespaced_pod_template(self.pod_template, self.namespace)
            ),
        )
        check_template(template, f"pod template {self.namespace}/{self.pod_template}")
        return template

    async def nodes(self, template: dict[str, Any] | None = None) -> list[NodeRoom] | None:
        """The nodes a host pod fits on, with their GPUs and what this gateway's pods leave of
        them; None when the service account may not list nodes."""
        template = template or await self._template()
        spec = template["template"]["spec"]
        selector = label_selector(spec.get("nodeSelector") or {})
        try:
            listing = await self._call(
                "list nodes",
                lambda api: api.api_client.sanitize_for_serialization(
                    api.list_node(label_selector=selector)
                ),
            )
        except HostProviderError as exc:
            if api_status(exc.__cause__ or exc) != 403:
                raise
            if not self._nodes_forbidden:
                log.warning(
                    "may not list nodes (%s): host pods are left to the scheduler, without "
                    "knowing the nodes' GPUs",
                    exc,
                )
            self._nodes_forbidden = True
            return None
        return node_rooms(listing.get("items") or [], self._pods.values(), spec)

    # -- finding what a previous run started, and cleaning up -----------------------------------

    async def discover(self) -> list[str]:
        """Adopt this gateway's host pods already in the namespace (a restart), deleting those
        that ended or cannot be scheduled; returns the names of the hosts kept."""
        async with self._lock:
            await self._refresh()
            return sorted(self._pods)

    async def _refresh(self) -> None:
        found = await self._list_pods()
        now = self._clock()
        pods: dict[str, dict[str, Any]] = {}
        for pod in found:
            name = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_HOST)
            if not name:
                continue
            number = host_number(name, self.name_prefix)
            if number is not None:
                self._next = max(self._next, number + 1)
            state = pod_state(pod, now, self.unschedulable_grace)
            if state in ("ended", "stuck"):
                reason = (pod.get("status") or {}).get("reason") or state
                log.warning("deleting host pod %s (%s)", pod["metadata"]["name"], reason)
                await self._delete(pod["metadata"]["name"])
                continue
            pods[name] = pod
        if not self._discovered and pods:
            log.info("adopted host pods %s", ", ".join(sorted(pods)))
        self._pods = pods
        self._discovered = True

    def _creator(self, pod: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
        def create(api: Any) -> dict[str, Any]:
            created: dict[str, Any] = api.api_client.sanitize_for_serialization(
                api.create_namespaced_pod(self.namespace, pod)
            )
            return created

        return create

    async def _delete(self, pod_name: str) -> None:
        try:
            await self._call(
                f"delete host pod {self.namespace}/{pod_name}",
                lambda api: api.delete_namespaced_pod(
                    pod_name, self.namespace, grace_period_seconds=round(self.stop_grace)
                ),
            )
        except HostProviderError as exc:
            if api_status(exc.__cause__ or exc) != 404:  # already gone: what was wanted
                raise

    # -- HostProvider ---------------------------------------------------------------------------

    async def start_hosts(self, count: int) -> list[str]:
        if count < 0:
            raise HostProviderError(f"cannot start {count} hosts")
        if self._closed:
            raise HostProviderError("the kubernetes host provider is closed")
        names: list[str] = []
        async with self._lock:
            await self._refresh()
            if count == 0:
                return names
            template = await self._template()
            spec = template["template"]["spec"]
            wanted = self.gpus_per_host if uses_gpus(spec) else None
            for _ in range(count):
                try:
                    rooms = await self.nodes(template)
                    node = None if rooms is None else choose_node(rooms, wanted)
                    if rooms is not None and node is None:
                        raise HostProviderError(
                            f"no node has room for another host pod ({len(rooms)} node(s) "
                            f"fit the template {self.pod_template}"
                            + (f", none with {wanted} free {GPU_RESOURCE}" if wanted else "")
                            + ")"
                        )
                    name = f"{self.name_prefix}-{self._next}"
                    # The number is used up even if creating fails: no name is tried twice.
                    self._next += 1
                    pod = host_pod(
                        template,
                        pod_name=self.pod_name(name),
                        labels=host_labels(self.gateway_id, name),
                        gateway_url=self.gateway_url,
                        host_name=name,
                        log_level=self.log_level,
                        gpus=self.gpus_per_host,
                        node=None if node is None else node.name,
                    )
                    created = await self._call(
                        f"create host pod {self.namespace}/{self.pod_name(name)}",
                        self._creator(pod),
                    )
                except HostProviderError as exc:
                    if not names:
                        raise
                    log.warning("started %d of %d host pods: %s", len(names), count, exc)
                    break
                self._pods[name] = created
                names.append(name)
                log.info(
                    "started host pod %s on %s",
                    self.pod_name(name),
                    "a node the scheduler picks" if node is None else f"node {node.name}",
                )
        return names

    async def stop_host(self, name: str) -> None:
        """Delete the pod of host ``name`` (the kubelet sends SIGTERM, and a kill after
        ``stop_grace`` seconds). One already gone is forgotten; a name it never started
        raises."""
        if name not in self._pods:
            raise HostProviderError(
                f"host {name!r} was not started by the kubernetes host provider of gateway "
                f"{self.gateway_id}"
            )
        async with self._lock:
            await self._delete(self.pod_name(name))
            self._pods.pop(name, None)
        log.info("deleted host pod %s", self.pod_name(name))

    def owns(self, name: str) -> bool:
        return name in self._pods

    def started(self) -> list[str]:
        now = self._clock()
        return sorted(
            n
            for n, p in self._pods.items()
            if pod_state(p, now, self.unschedulable_grace) == "live"
        )

    async def close(self) -> None:
        """With ``stop_on_exit``, delete every host pod; else leave them for the next gateway
        (their daemons reconnect to it)."""
        self._closed = True
        if self.stop_on_exit:
            for name in list(self._pods):
                try:
                    await self.stop_host(name)
                except HostProviderError as exc:
                    log.error("could not delete host pod %s: %s", self.pod_name(name), exc)
        elif self._pods:
            log.info(
                "host pods %s keep running for the next gateway", ", ".join(sorted(self._pods))
            )
        if self._api is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._api.api_client.close)
