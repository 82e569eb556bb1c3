"""The scheduler driver's two kinds of background work on replicas, up to the point where the
driver takes over again: a migration (a ``Migrate``, carried out by the
:class:`~._driver_collaborators.ReplicaMover`) and an eviction of GPU memory (an ``Evict``,
asked of the :class:`~._driver_collaborators.Evictor`). Each is timed and counted in the
gateway's metrics, and neither raises for the collaborator's failure.

The driver (``_driver``) runs :func:`run_migration` and :func:`run_eviction` in background
tasks, one per action; what follows (dispatching the cell that waited for the migration, or
asking again; giving the scheduler its ``EvictionFinished``) is the driver's.
"""

from __future__ import annotations

import logging
import time

from ..scheduling import Evict, EvictionFinished, Migrate
from ._driver_collaborators import EvictionResult, Evictor, ReplicaMover
from ._metrics import GatewayMetrics

__all__ = ["run_eviction", "run_migration"]

log = logging.getLogger(__name__)


async def run_migration(
    mover: ReplicaMover | None, migrate: Migrate, metrics: GatewayMetrics
) -> bool:
    """Have the replica moved; True when it was. A missing mover or one that raises is a
    failed migration (its exception logged), never an exception."""
    started = time.monotonic()
    ok = False
    try:
        if mover is not None:
            ok = await mover.move_replica(migrate)
    except Exception:
        log.exception("migration of replica %s failed", migrate.replica_id)
    metrics.migrations.labels("ok" if ok else "failed").inc()
    if ok:
        metrics.migration_seconds.observe(time.monotonic() - started)
    return ok


async def run_eviction(
    evictor: Evictor | None, evict: Evict, metrics: GatewayMetrics
) -> tuple[EvictionResult, EvictionFinished]:
    """Ask the replica to free the devices; the result and the scheduler's event for it. A
    missing evictor or one that raises is a failed eviction, never an exception."""
    started = time.monotonic()
    try:
        if evictor is None:
            result = EvictionResult(False, error="the gateway has no evictor")
        else:
            result = await evictor.evict(
                evict.kernel_id, evict.replica_id, evict.device_indices, evict.reason
            )
    except Exception as exc:
        log.exception("eviction of replica %s failed", evict.replica_id)
        result = EvictionResult(False, error=f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    metrics.evictions.labels("ok" if result.ok else "failed").inc()
    metrics.eviction_seconds.observe(seconds)
    metrics.evicted_bytes.inc(result.freed_bytes)
    if not result.ok:
        log.warning(
            "kernel %s replica %s did not free GPU %s of %s: %s",
            evict.kernel_id,
            evict.replica_id,
            list(evict.device_indices),
            evict.host,
            result.error,
        )
    finished = EvictionFinished(
        evict.kernel_id,
        evict.replica_id,
        evict.device_indices,
        result.ok,
        result.freed_bytes,
        seconds,
        result.error,
    )
    return result, finished
