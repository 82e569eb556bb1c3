"""Host daemons as Docker Swarm services (``nbcluster gateway --hosts-from swarm``).

**One service per host.** Each host daemon is a replicated service of one task,
``nbcluster-<gateway id>-<host name>``, labelled like the ``docker`` provider's containers
(``nbcluster.provider=swarm``, ``nbcluster.gateway``, ``nbcluster.host``; its containers carry
the same labels), with restart condition ``any``: Swarm replaces a task that dies, under the
same host name, so the gateway sees the host come back. Why not one service whose replica
count the auto-scaler sets: scaling a replicated service down lets Swarm choose which task to
end, and the auto-scaler must stop the *idle* host it chose (a busy one holds replicas and
bound GPUs); a service per host makes every start and stop exact, and ``docker service ls
--filter label=nbcluster.gateway=ID`` still lists the pool.

**Placement.** The provider picks a node for each new host and pins the service there
(``node.id==…`` added to the operator's constraints): among ready, active nodes that satisfy the
constraints (``node.labels.*``, ``engine.labels.*``, ``node.role``, ``node.hostname``,
``node.id``, ``node.platform.os|arch``, with ``==`` or ``!=``), the one with the fewest of this
gateway's hosts, at most ``hosts_per_node`` each (1: one host daemon per GPU machine). Pinning
gives the daemon its ``--address``: the node's address as Swarm knows it, where the replicas
listen (host networking). On another network the container's own address is used.

**GPUs.** ``virtual``: ``--gpus N``. ``nvidia``: the service reserves ``N`` ``NVIDIA-GPU``
generic resources (the nodes' dockerd advertise them, ``node-generic-resources``, and the
NVIDIA runtime exposes the devices Swarm assigned); the daemon finds them with NVML.

**Secrets.** The join token is a Docker secret mounted at
``/run/secrets/nbcluster-join-token`` (mode 0400, owned by the image's user) and read with
``--join-token-file``: the operator's (``join_token_secret``), or one the provider makes from
the gateway's join token, named with a fingerprint of it (``nbcluster-join-<gateway id>-<8
hex>``), so a new token gets a new secret. A CA file goes as a Docker config.

A restarted gateway finds its services by label (:meth:`discover`). Services outlive the
gateway unless ``stop_on_exit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._container_hosts import (
    CA_PATH,
    LABEL_GATEWAY,
    LABEL_HOST,
    LABEL_PROVIDER,
    ContainerHostProvider,
    HostTemplate,
    docker_call,
    docker_module,
)
from ._errors import HostProviderError

__all__ = ["JOIN_TOKEN_PATH", "SwarmHostProvider", "choose_node", "node_address", "node_matches"]

log = logging.getLogger(__name__)

#: Where a host daemon's container finds the join token.
JOIN_TOKEN_PATH = "/run/secrets/nbcluster-join-token"

_NS = 1_000_000_000


@dataclass
class _Service:
    id: str
    node: str | None
    #: False while its node is not ready: it cannot run, and does not count as started.
    live: bool = True


def _constraint_value(attrs: dict[str, Any], key: str) -> str | None:
    spec = attrs.get("Spec") or {}
    description = attrs.get("Description") or {}
    if key == "node.id":
        return str(attrs.get("ID", ""))
    if key == "node.hostname":
        return str(description.get("Hostname", ""))
    if key == "node.role":
        return str(spec.get("Role", ""))
    if key in ("node.platform.os", "node.platform.arch"):
        field = "OS" if key.endswith(".os") else "Architecture"
        return str((description.get("Platform") or {}).get(field, ""))
    if key.startswith("node.labels."):
        return (spec.get("Labels") or {}).get(key.removeprefix("node.labels."))
    if key.startswith("engine.labels."):
        labels = (description.get("Engine") or {}).get("Labels") or {}
        return labels.get(key.removeprefix("engine.labels."))
    raise HostProviderError(
        f"placement constraint on {key!r} is not understood (node.id, node.hostname, "
        "node.role, node.platform.os|arch, node.labels.*, engine.labels.*)"
    )


def node_matches(attrs: dict[str, Any], constraint: str) -> bool:
    """Whether the node (``docker node inspect``'s attributes) meets one placement
    constraint, ``key==value`` or ``key!=value``."""
    for op in ("==", "!="):
        key, found, value = constraint.partition(op)
        if found:
            break
    else:
        raise HostProviderError(f"placement constraint {constraint!r} has no == or !=")
    key, value = key.strip(), value.strip()
    actual = _constraint_value(attrs, key)
    # Swarm compares node attributes without regard to case, labels exactly.
    same = actual == value if ".labels." in key else (actual or "").casefold() == value.casefold()
    return same if op == "==" else not same


def node_address(attrs: dict[str, Any]) -> str:
    """The address Swarm knows the node by (a manager's advertised one when its status
    says 0.0.0.0)."""
    address = str((attrs.get("Status") or {}).get("Addr") or "")
    if address in ("", "0.0.0.0"):
        manager = str((attrs.get("ManagerStatus") or {}).get("Addr") or "")
        address = manager.rpartition(":")[0] if ":" in manager else manager
    if not address:
        raise HostProviderError(f"node {attrs.get('ID')} has no address")
    return address


def choose_node(
    nodes: Iterable[dict[str, Any]],
    constraints: Iterable[str],
    hosts_on: dict[str, int],
    per_node: int,
) -> dict[str, Any] | None:
    """The node for the next host: ready, active, meeting every constraint, with fewer than
    ``per_node`` hosts (``hosts_on``: node id → this gateway's hosts there), the emptiest
    first (then by hostname). None: no node has room."""
    constraints = list(constraints)
    fits = [
        n
        for n in nodes
        if (n.get("Status") or {}).get("State") == "ready"
        and (n.get("Spec") or {}).get("Availability") == "active"
        and hosts_on.get(str(n.get("ID")), 0) < per_node
        and all(node_matches(n, c) for c in constraints)
    ]
    if not fits:
        return None
    return min(
        fits,
        key=lambda n: (
            hosts_on.get(str(n.get("ID")), 0),
            str((n.get("Description") or {}).get("Hostname", "")),
            str(n.get("ID")),
        ),
    )


def _pinned_node(service_attrs: dict[str, Any]) -> str | None:
    placement = ((service_attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("Placement")
    for constraint in (placement or {}).get("Constraints") or []:
        key, found, value = str(constraint).partition("==")
        if found and key.strip() == "node.id":
            return value.strip()
    return None


class SwarmHostProvider(ContainerHostProvider[_Service]):
    """Host daemons as one-task Swarm services (module docstring), created through the
    manager ``client`` talks to (default: ``docker.from_env()``)."""

    name = "swarm"
    _kind = "host service"
    _stop_verb = "remove"
    _log = log

    def _check(self, template: HostTemplate) -> None:
        if template.settings.hosts_per_node < 1:
            raise ValueError("hosts_per_node must be 1 or more")

    @property
    def secret_name(self) -> str:
        """The Docker secret the hosts read the join token from."""
        if self.settings.join_token_secret:
            return self.settings.join_token_secret
        fingerprint = hashlib.sha256(self._join_token.encode()).hexdigest()[:8]
        return f"nbcluster-join-{self.template.gateway_id}-{fingerprint}"

    def service_name(self, name: str) -> str:
        return self.template.resource_name(name)

    # -- finding what a previous run started ----------------------------------------------------

    async def _discover(self) -> None:
        def listing() -> tuple[list[Any], dict[str, dict[str, Any]]]:
            client = self.client()
            services = list(client.services.list(filters=self.template.filters()))
            nodes = {str(n.attrs["ID"]): n.attrs for n in client.nodes.list()}
            return services, nodes

        found, nodes = await asyncio.to_thread(docker_call, "list host services", listing)
        services: dict[str, _Service] = {}
        for service in found:
            name = ((service.attrs.get("Spec") or {}).get("Labels") or {}).get(LABEL_HOST)
            if not name:
                continue
            node = _pinned_node(service.attrs)
            if node is not None and node not in nodes:
                # Its node left the swarm: the service can never run again.
                log.warning("host service %s: node %s left the swarm; removing it", name, node)
                with contextlib.suppress(HostProviderError):
                    await asyncio.to_thread(
                        docker_call, f"remove host service {name}", service.remove
                    )
                continue
            ready = node is None or (nodes[node].get("Status") or {}).get("State") == "ready"
            services[name] = _Service(service.id, node, live=ready)
        self._adopt(services)

    # -- HostProvider ---------------------------------------------------------------------------

    async def _start(self, count: int) -> list[str]:
        names: list[str] = []
        if count == 0:
            return names
        refs = await asyncio.to_thread(self._references)
        nodes = await asyncio.to_thread(
            docker_call,
            "list swarm nodes",
            lambda: [n.attrs for n in self.client().nodes.list()],
        )
        for _ in range(count):
            hosts_on: dict[str, int] = {}
            for s in self._hosts.values():
                if s.node is not None:
                    hosts_on[s.node] = hosts_on.get(s.node, 0) + 1
            node = choose_node(
                nodes, self.settings.constraints, hosts_on, self.settings.hosts_per_node
            )
            if node is None:
                message = (
                    f"no swarm node has room for another host (constraints "
                    f"{list(self.settings.constraints) or 'none'}, at most "
                    f"{self.settings.hosts_per_node} per node, {len(nodes)} node(s))"
                )
                if not names:
                    raise HostProviderError(message)
                log.warning("started %d of %d host services: %s", len(names), count, message)
                break
            name = f"{self.settings.name_prefix}-{self._next}"
            try:
                service = await asyncio.to_thread(self._create, name, node, refs)
            except HostProviderError as exc:
                if not names:
                    raise
                log.warning("started %d of %d host services: %s", len(names), count, exc)
                break
            self._next += 1
            self._hosts[name] = _Service(service.id, str(node["ID"]))
            names.append(name)
            log.info(
                "started host service %s on node %s",
                self.service_name(name),
                (node.get("Description") or {}).get("Hostname", node["ID"]),
            )
        return names

    def _labels(self) -> dict[str, str]:
        return {LABEL_PROVIDER: "swarm", LABEL_GATEWAY: self.template.gateway_id}

    def _references(self) -> dict[str, Any]:
        """The secret (and CA config) references of every host service, made if absent (in a
        thread)."""
        docker = docker_module()
        uid, _, gid = self.settings.user.partition(":")
        gid = gid or uid
        client = self.client()
        name = self.secret_name

        def find(collection: Any, wanted: str) -> Any:
            return next(
                (s for s in collection.list(filters={"name": wanted}) if s.name == wanted), None
            )

        secret = docker_call(f"look up the secret {name}", lambda: find(client.secrets, name))
        if secret is None:
            if self.settings.join_token_secret:
                raise HostProviderError(
                    f"the join-token secret {name!r} does not exist (create it from "
                    "`nbcluster join-token`, or leave --join-token-secret out)"
                )
            secret = docker_call(
                f"create the secret {name}",
                lambda: client.secrets.create(
                    name=name, data=self._join_token.encode(), labels=self._labels()
                ),
            )
            log.info("made the Docker secret %s with the join token", name)
        refs: dict[str, Any] = {
            "secrets": [
                docker.types.SecretReference(
                    secret.id, name, filename=JOIN_TOKEN_PATH, uid=uid, gid=gid, mode=0o400
                )
            ]
        }
        ca = self.settings.ca
        if ca is not None:
            data = ca.read_bytes()
            config_name = (
                f"nbcluster-ca-{self.template.gateway_id}-{hashlib.sha256(data).hexdigest()[:8]}"
            )
            config = docker_call(
                f"look up the config {config_name}", lambda: find(client.configs, config_name)
            )
            if config is None:
                config = docker_call(
                    f"create the config {config_name}",
                    lambda: client.configs.create(
                        name=config_name, data=data, labels=self._labels()
                    ),
                )
            refs["configs"] = [
                docker.types.ConfigReference(
                    config.id, config_name, filename=CA_PATH, uid=uid, gid=gid, mode=0o444
                )
            ]
        return refs

    def _create(self, name: str, node: dict[str, Any], refs: dict[str, Any]) -> Any:
        """Create the service of host ``name`` pinned to ``node`` (in a thread)."""
        docker = docker_module()
        template = self.template
        if template.host_network:
            address: str | None = self.settings.address or node_address(node)
        else:
            address = None
        resources = None
        if self.settings.gpus == "nvidia":
            resources = docker.types.Resources(
                generic_resources={"NVIDIA-GPU": template.gpus_per_host}
            )
        labels = template.labels(name)
        mounts = [
            docker.types.Mount(m.target, m.source, type=m.type, read_only=m.read_only)
            for m in template.mounts(ca=False)
        ]
        return docker_call(
            f"create host service {self.service_name(name)} from {self.settings.image}",
            lambda: self.client().services.create(
                self.settings.image,
                command=template.entrypoint(address),
                args=[*template.args(name, address), "--join-token-file", JOIN_TOKEN_PATH],
                name=self.service_name(name),
                labels=labels,
                container_labels=labels,
                mode=docker.types.ServiceMode("replicated", replicas=1),
                constraints=[*self.settings.constraints, f"node.id=={node['ID']}"],
                networks=[self.settings.network],
                mounts=mounts,
                resources=resources,
                restart_policy=docker.types.RestartPolicy(condition="any", delay=_NS),
                stop_grace_period=int(self.stop_grace * _NS),
                init=True,
                **refs,
            ),
        )

    async def _stop(self, name: str, host: _Service) -> None:
        """Remove the service (Swarm stops its task: SIGTERM, a kill after the grace
        period)."""
        errors = docker_module().errors

        def remove() -> None:
            with contextlib.suppress(errors.NotFound):
                self.client().services.get(host.id).remove()

        await asyncio.to_thread(
            docker_call, f"remove host service {self.service_name(name)}", remove
        )
        log.info("removed host service %s", self.service_name(name))
