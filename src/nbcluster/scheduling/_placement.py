"""Where to place replicas and where a replica may migrate to, with the reasons when nowhere.

Decisions only: :class:`._state.Scheduler` calls these for ``KernelRequested``,
``ReplicaRequested`` and ``MigrationRequested``, then places or moves the claims itself
(``_binding``). They search the :class:`HostIndex` (least GPU-subscribed first for claims,
most free devices first for a kernel that binds its GPUs at placement) and word every refusal
for the user who asked.
"""

from __future__ import annotations

from ._actions import Action, MigrationRefused, RejectKernel, ScaleOut
from ._confinement import Confinement
from ._hosts import HostIndex
from ._model import Host, Kernel
from ._policies import Policy
from ._resources import Resources

__all__ = [
    "kernel_hosts",
    "migration_target",
    "replica_host",
    "scale_out",
    "waiting_scale_out",
]


def kernel_hosts(
    index: HostIndex,
    kernel_id: str,
    request: Resources,
    policy: Policy,
    count: int,
    where: Confinement,
) -> tuple[list[Host], list[Action]]:
    """The hosts for a new kernel's ``count`` replicas; or none, and the actions that refuse
    the kernel (with a ``ScaleOut`` where new hosts could take it)."""
    if not index.hosts and where.scalable:
        reason = "the cluster has no hosts"
        return [], [RejectKernel(kernel_id, reason), ScaleOut(count, reason, where.hosts)]
    too_big = index.too_big(request, where)
    if too_big is not None:
        return [], [RejectKernel(kernel_id, too_big)]
    if policy.commit_at_placement and request.gpus > 0:
        if count != 1:
            return [], [
                RejectKernel(kernel_id, f"policy {policy.name} runs 1 replica, got {count}")
            ]
        target = index.free_host(request, exclude=(), where=where)
        if target is None:
            reason = f"requests {request.gpus} GPUs; no host{where} has {request.gpus} free GPUs"
            return [], [RejectKernel(kernel_id, reason, full=True), *scale_out(where, 1, reason)]
        return [target], []
    hosts = index.least_loaded(request, count, exclude=(), where=where)
    if len(hosts) < count:
        reason = (
            f"{count} replicas need {count} hosts{where} with room for "
            f"{_describe(request)}; {len(hosts)} have room"
        )
        return [], [
            RejectKernel(kernel_id, reason, full=True),
            *scale_out(where, count - len(hosts), reason),
        ]
    return hosts, []


def replica_host(index: HostIndex, kernel: Kernel, life_long: bool) -> Host | None:
    """A host for one more replica of ``kernel``, on none of its replicas' hosts; with
    ``life_long`` (it binds its GPUs at placement) one with enough free devices."""
    exclude = set(kernel.replicas.values())
    if life_long:
        return index.free_host(kernel.request, exclude, kernel.confinement)
    hosts = index.least_loaded(kernel.request, 1, exclude, kernel.confinement)
    return hosts[0] if hosts else None


def waiting_scale_out(index: HostIndex, kernel: Kernel, gpus: int) -> list[Action]:
    """A ``ScaleOut`` for a cell of ``kernel`` that now waits for ``gpus`` GPUs, if a host
    started now could run it: only by a migration there, so only under a policy that migrates
    and with a peer replica to catch up from (``Binder.try_bind``), and only while no host has
    that many free. A ``batch`` or lone-replica cell waits for its own host: a ``ScaleOut`` for
    it would start a host it never uses (issue 18: 6,577 hosts started and stopped in one
    replay of the Sensei trace)."""
    if not (kernel.policy.migrates and len(kernel.replicas) >= 2) or index.most_free() >= gpus:
        return []
    return scale_out(kernel.confinement, 1, f"a cell of {kernel.kernel_id} waits for {gpus} GPUs")


def migration_target(
    index: HostIndex, kernel: Kernel, replica_id: str, to_host: str | None
) -> Host | MigrationRefused:
    """Where an operator's migration of ``replica_id`` goes (``to_host``, else the least
    loaded host that may take it), or why it may not move now."""
    kid, rid = kernel.kernel_id, replica_id
    if rid not in kernel.replicas:
        return MigrationRefused(kid, rid, f"kernel {kid} has no replica {rid}")
    b = kernel.binding
    if b is not None and b.replica_id == rid:
        why = "holds GPUs for its whole life" if b.term is None else "is executing a cell"
        return MigrationRefused(kid, rid, f"replica {rid} {why}; it cannot move now")
    if len(kernel.replicas) < 2:
        return MigrationRefused(kid, rid, "a kernel with one replica has no peer to catch up from")
    others = {h for r, h in kernel.replicas.items() if r != rid}
    source = index.hosts[kernel.replicas[rid]]
    if to_host is None:
        found = index.least_loaded(kernel.request, 1, others | {source.name}, kernel.confinement)
        if not found:
            return MigrationRefused(
                kid,
                rid,
                f"no other host{kernel.confinement} has room for {_describe(kernel.request)}",
            )
        return found[0]
    target = index.hosts.get(to_host)
    if target is None:
        return MigrationRefused(kid, rid, f"no host named {to_host}")
    if target.name == source.name or target.name in others:
        return MigrationRefused(
            kid, rid, f"host {target.name} already runs a replica of kernel {kid}"
        )
    if kernel.pool is not None and target.pool != kernel.pool:
        where = "no pool" if target.pool is None else f"pool {target.pool!r}"
        return MigrationRefused(
            kid,
            rid,
            f"host {target.name} is in {where}; kernel {kid} runs only in pool {kernel.pool!r}",
        )
    if kernel.hosts is not None and target.name not in kernel.hosts:
        only = str(Confinement(hosts=kernel.hosts)).removeprefix(" among hosts ")
        return MigrationRefused(
            kid, rid, f"kernel {kid} runs only on hosts {only}, not on {target.name}"
        )
    if not index.can_place(target, kernel.request):
        return MigrationRefused(
            kid,
            rid,
            f"host {target.name} has no room for {_describe(kernel.request)} "
            f"(draining, too small, or over the subscription cap)",
        )
    return target


def _describe(request: Resources) -> str:
    return (
        f"{request.gpus} GPUs, {request.millicpus} millicpus, {request.memory_mb} MB, "
        f"{request.vram_gb:g} GB VRAM"
    )


def scale_out(where: Confinement, count: int, reason: str) -> list[Action]:
    """A ``ScaleOut`` for a kernel without a pool (the auto-scaler's hosts join none), among
    its named hosts if it has them."""
    return [ScaleOut(count, reason, where.hosts)] if where.scalable else []
