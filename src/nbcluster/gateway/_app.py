"""The gateway: wires hosts, kernels, kernelspecs, kernel records, jobs, metrics and the
auto-scaler into one :class:`Gateway`, and runs its periodic tasks. The HTTP side (routers,
auth, JSON errors) is ``_asgi.create_app``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from .._tasks import BackgroundTasks
from ..jobs import JobStore, open_job_store
from ..scheduling import HostView, KernelView, ScaleIn, ScaleOut, ScalingConfig
from ._access import Access
from ._autoscaler import Autoscaler
from ._config import GatewayConfig
from ._errors import HostProviderError
from ._faces import ZmqFaces
from ._host_providers import adopt_hosts, make_host_provider, watch_hosts
from ._hosts import HostRegistry
from ._identity import GatewayIdentity
from ._jobs import JobManager
from ._kernel import GatewayKernel
from ._kernelspecs import KernelSpecRegistry
from ._manager import KernelManager
from ._metrics import GatewayMetrics
from ._notifier import Notifier
from ._provider import HostProvider, MachineHostProvider
from ._state import FileStateStore, StateStore

__all__ = ["Gateway"]

log = logging.getLogger(__name__)


class Gateway:
    """Everything one gateway process holds. Built by ``_asgi.create_app``."""

    def __init__(
        self,
        config: GatewayConfig,
        state_store: StateStore | None = None,
        job_store: JobStore | None = None,
    ) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        #: Cluster notices: the ring and Redis stream behind ``/api/cluster/events``.
        self.notifier = Notifier(config.notice_capacity, config.redis_url)
        #: Who may call what: admin token, users, kernel tokens, the join token.
        self.identity = GatewayIdentity(config, self._owner_of)
        self.hosts = HostRegistry(config.host_lost_timeout)
        self.specs = KernelSpecRegistry(config.kernelspec_dirs)
        #: Where kernel records are kept (``--state-dir``).
        self.state_store = (
            state_store if state_store is not None else FileStateStore(config.state_dir)
        )
        #: Set in :meth:`start` when the gateway may add hosts (``max_hosts`` above 0); the
        #: kernel manager and the scheduler driver reach it through this gateway
        #: (``request_hosts`` and friends), which answers for it when there is none.
        self.autoscaler: Autoscaler | None = None
        self.kernels = KernelManager(
            config,
            self.hosts,
            self.specs,
            self.state_store,
            self.metrics,
            host_supply=self,
            kernel_tokens=self.identity.kernel_tokens,
            gpu_quota_of=lambda user: self.identity.quotas_of(user).gpus,
            notifier=self.notifier,
        )
        #: The one driver of the scheduler (owned by the kernel manager): views for readers.
        self.scheduling = self.kernels.scheduling
        self.jobs = JobManager(
            job_store if job_store is not None else _job_store(config),
            self.hosts,
            self.scheduling,
            self.metrics,
            config.store_url or config.store_dir.as_uri(),
            yield_to_cells=config.jobs_yield_to_cells,
            subscriber_buffer=config.subscriber_buffer_bytes,
            object_store=self.kernels.object_store,
            notifier=self.notifier,
        )
        #: What each caller may see and touch, and the quotas (the API's checks).
        self.access = Access(config, self.identity, self.kernels, self.specs, self.jobs)
        self.metrics.watch(self.hosts, lambda: self.kernels.kernels.values(), self.scheduling)
        #: Kernels' ZMQ faces for jupyter_client tools (``_faces``), opened on request.
        self.faces = ZmqFaces(config, self.metrics, self.kernels, self.state_store.save)
        self._background = BackgroundTasks("gateway", log)

    def _owner_of(self, kernel_id: str) -> str | None:
        kernel = self.kernels.kernels.get(kernel_id)
        return None if kernel is None else kernel.record.owner

    async def start(self) -> None:
        await self.notifier.start()
        self.kernels.restore()
        self.faces.restore(self.kernels.kernels.values())
        self.jobs.restore()
        self._background.spawn(
            "orphan job check", self._expire_orphan_jobs(self.config.host_lost_timeout * 2)
        )
        self._background.spawn("host watchdog", self._watch_hosts())
        if self.config.reclaim_idle_after is not None:
            self._background.spawn("idle reclamation", self.kernels.reclaim_idle())
        if self.config.max_hosts > 0:
            self.autoscaler = self._make_autoscaler()
            self._background.spawn("auto-scaler", self._run_autoscaler(self.autoscaler))

    # -- hosts on demand (``HostSupply`` of the kernel manager and the scheduler driver) -----

    def request_hosts(self, action: ScaleOut) -> None:
        if self.autoscaler is None:
            log.info("would scale out by %d host(s): %s", action.count, action.reason)
        else:
            self.autoscaler.request(action)

    def release_hosts(self, action: ScaleIn) -> None:
        if self.autoscaler is None:
            log.info("would scale in %s: %s", ", ".join(action.hosts), action.reason)
        else:
            self.autoscaler.release(action)

    async def wait_for_hosts(self, timeout: float) -> bool:
        if self.autoscaler is None:
            return False  # nothing is coming
        return await self.autoscaler.wait_for_hosts(timeout)

    def host_registered(self, name: str) -> None:
        if self.autoscaler is not None:
            self.autoscaler.host_registered(name)

    def hosts_of(self, machines: Sequence[str]) -> frozenset[str]:
        provider = None if self.autoscaler is None else self.autoscaler.provider
        if not isinstance(provider, MachineHostProvider):
            raise HostProviderError(
                "remote_hosts need daemons started over ssh: run the gateway with "
                "--hosts-from ssh and auto-scaling on (--max-hosts N)"
            )
        return provider.hosts_of(machines)

    def _make_autoscaler(self, provider: HostProvider | None = None) -> Autoscaler:
        config = self.config
        if provider is None:
            # --hosts-from: local processes, docker containers or swarm services, told the
            # gateway's advertised URL (--public-url).
            provider = make_host_provider(
                config,
                self.identity.join_token,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
                kernelspec_machines=self.specs.remote_hosts(),
            )
        scaling = ScalingConfig(
            buffer_hosts=config.scaling_buffer,
            min_hosts=config.min_hosts,
            max_hosts=config.max_hosts,
            gpus_per_host=max(config.scaling_gpus_per_host, 1),
            replicas_per_kernel=config.replicas_per_kernel,
        )
        return Autoscaler(
            provider,
            self.scheduling,
            self.hosts,
            self.metrics,
            scaling,
            config.scaling_interval,
            startup_grace=max(2 * config.host_lost_timeout, 5.0),
            notifier=self.notifier,
        )

    async def _run_autoscaler(self, autoscaler: Autoscaler) -> None:
        # Container providers first find the hosts an earlier run of this gateway started,
        # then keep looking at them (one removed by hand no longer counts).
        await adopt_hosts(autoscaler.provider)
        self._background.spawn(
            "host provider watch",
            watch_hosts(autoscaler.provider, max(self.config.scaling_interval, 2.0)),
        )
        await autoscaler.run()

    def begin_stop(self) -> None:
        """Called as soon as the server is told to stop (``_server``), before it closes the
        hosts' connections: what goes away from then on is not a loss to repair."""
        self.kernels.reconciler.begin_stop()

    async def stop(self) -> None:
        self.begin_stop()
        await self._background.close()
        await self.faces.close()
        await self.kernels.close()
        await self.jobs.close()
        await self.identity.aclose()
        if self.autoscaler is not None:
            await self.autoscaler.close()
        await self.notifier.close()

    async def _watch_hosts(self) -> None:
        period = min(self.config.heartbeat_interval, self.config.host_lost_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for entry in self.hosts.find_lost(time.monotonic()):
                self.kernels.on_host_lost(entry)
                self.jobs.on_worker_lost(entry.name)

    async def _expire_orphan_jobs(self, delay: float) -> None:
        """Jobs restored as running whose worker never came back are run again."""
        await asyncio.sleep(delay)
        for live in list(self.jobs.jobs.values()):
            job = live.job
            if job.status == "running" and job.worker not in self.hosts.hosts:
                self.jobs.on_worker_lost(job.worker or "?")

    def host_summaries(self) -> list[dict[str, Any]]:
        replicas: dict[str, list[dict[str, str]]] = {}
        for kernel in self.kernels.kernels.values():
            for r in kernel.live_replicas():
                replicas.setdefault(r.host, []).append(
                    {"kernel_id": kernel.id, "replica_id": r.replica_id, "state": r.state}
                )
        now = time.monotonic()
        views = self.scheduling.host_views()
        return [
            {
                **_gpu_state(views.get(h.name)),
                "name": h.name,
                "state": h.state,
                "address": h.address,
                "pool": h.resources.pool,
                "cpus": h.resources.cpus,
                "memory_mb": h.resources.memory_mb,
                "gpus": [g.model_dump() for g in h.resources.gpus],
                "seconds_since_heartbeat": round(now - h.last_seen, 3),
                "replicas": replicas.get(h.name, []),
            }
            for h in sorted(self.hosts.hosts.values(), key=lambda h: h.name)
        ]

    def kernel_summary(self, k: GatewayKernel) -> dict[str, Any]:
        """One kernel for the cluster API: where its replicas run, and whether it runs with
        fewer than configured (``degraded``; ``repair`` says what is done about it)."""
        view = self.scheduling.kernel_view(k.id)
        return {
            **_scheduling_state(k.record.policy, view),
            **k.model(),
            "created": k.record.created.isoformat(),
            "owner": k.record.owner,
            "pool": k.record.pool,
            "hosts": k.record.hosts,
            "executor": k.executor,
            "execution_count": k.execution_count,
            "dead_reason": k.record.dead_reason,
            "replicas_wanted": k.record.replica_count,
            "replicas_running": k.serving_replicas,
            "degraded": k.degraded,
            "repair": None if k.repair is None else k.repair.summary(),
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "host": r.host,
                    "state": r.state,
                    "pid": r.pid,
                    "reason": r.reason,
                }
                for r in k.record.replicas
            ],
        }


def _gpu_state(view: HostView | None) -> dict[str, Any]:
    if view is None:
        return {"gpus_idle": None, "gpus_committed": None, "gpus_pending": None}
    return {
        "gpus_idle": view.idle_gpus,
        "gpus_committed": view.committed_gpus,
        "gpus_pending": view.pending.gpus,
        "subscription_ratio": round(view.subscription_ratio, 3),
        "draining": view.draining,
    }


def _scheduling_state(policy: str, view: KernelView | None) -> dict[str, Any]:
    if view is None:
        return {"policy": policy, "request": None, "binding": None, "waiting_cells": 0}
    b = view.binding
    return {
        "policy": view.policy,
        "request": view.request.fields(),
        "binding": None
        if b is None
        else {"term": b.term, "replica_id": b.replica_id, "host": b.host, "gpus": b.device_indices},
        "waiting_cells": len(view.waiting),
    }


def _job_store(config: GatewayConfig) -> JobStore:
    """Redis when the gateway was given ``--redis``, else files under the state directory."""
    return open_job_store(config.redis_url, config.state_dir / "jobs")
