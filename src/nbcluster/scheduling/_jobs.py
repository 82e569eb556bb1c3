"""GPUs held outside cells: batch jobs' devices, and users' GPU quotas over cells and jobs.

:class:`._state.Scheduler` owns one :class:`JobLedger` and one :class:`UserQuotas`; it passes
them ``JobGpusRequested`` / ``JobGpusReleased`` and ``UserQuotaSet``, and asks
:meth:`UserQuotas.over` before it binds a cell (``_waiting`` asks too, when it serves the
queue). The job manager picks a worker and free devices from the host views, then asks for
them; they are committed to the job (and count as a pending claim on its host) until it
releases them, so a GPU is never given to a job and a cell at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._actions import Action, BindJobGpus, JobGpusRefused
from ._events import JobGpusRequested
from ._hosts import HostIndex
from ._model import Kernel
from ._resources import Resources
from ._vram import VramLedger

__all__ = ["JobLedger", "UserQuotas"]


class JobLedger:
    """The devices each job holds, and on which host."""

    def __init__(self, index: HostIndex, vram: VramLedger) -> None:
        self._index = index
        self._vram = vram
        #: The host of every job holding GPUs.
        self._hosts: dict[str, str] = {}
        #: The owners of jobs holding GPUs (for quotas).
        self._owners: dict[str, str] = {}

    def request(self, event: JobGpusRequested) -> list[Action]:
        job_id = event.job_id
        held = self._hosts.get(job_id)
        if held is not None:
            return [JobGpusRefused(job_id, f"job {job_id} already holds GPUs on {held}")]
        host = self._index.hosts.get(event.host)
        if host is None:
            return [JobGpusRefused(job_id, f"no host named {event.host}")]
        if host.drain_requested:
            return [JobGpusRefused(job_id, f"host {host.name} is draining")]
        devices = tuple(sorted(event.device_indices))
        if not devices or len(set(devices)) != len(devices) or not set(devices) <= host.free:
            return [
                JobGpusRefused(job_id, f"GPUs {list(devices)} of host {host.name} are not all free")
            ]
        host.free.difference_update(devices)
        host.jobs[job_id] = devices
        if event.owner:
            self._owners[job_id] = event.owner
        host.pending = host.pending + Resources(gpus=len(devices))
        self._hosts[job_id] = host.name
        self._index.reindex(host)
        evict = self._vram.evict_for(host.name, devices, f"job {job_id}")
        return [BindJobGpus(job_id, host.name, devices), *evict]

    def release(self, job_id: str) -> bool:
        """Free a job's devices; False if it held none."""
        name = self._hosts.pop(job_id, None)
        self._owners.pop(job_id, None)
        if name is None:
            return False
        host = self._index.hosts[name]
        devices = host.jobs.pop(job_id)
        host.pending = host.pending - Resources(gpus=len(devices))
        self._index.refresh_free(host)
        self._index.reindex(host)
        return True

    def forget(self, job_ids: Mapping[str, object]) -> None:
        """Forget the jobs of a removed host (their devices went with it)."""
        for job_id in job_ids:
            del self._hosts[job_id]
            self._owners.pop(job_id, None)

    def held_by(self, owner: str) -> int:
        """How many devices ``owner``'s jobs hold."""
        hosts = self._index.hosts
        return sum(
            len(hosts[host].jobs.get(job_id, ()))
            for job_id, host in self._hosts.items()
            if self._owners.get(job_id) == owner and host in hosts
        )


class UserQuotas:
    """Users' GPU quotas (``UserQuotaSet``), counted over their bound cells and jobs."""

    def __init__(self, kernels: Mapping[str, Kernel], jobs: JobLedger) -> None:
        self._kernels = kernels
        self._jobs = jobs
        self._limits: dict[str, int] = {}

    def set(self, user: str, gpus: int | None) -> None:
        if gpus is None:
            self._limits.pop(user, None)
        else:
            self._limits[user] = gpus

    def over(self, kernel: Kernel, gpus: int) -> str | None:
        """Why a cell of ``kernel`` needing ``gpus`` GPUs would pass its owner's quota now
        (None: it would not). Counted when asked: only users with a quota pay for it."""
        limit = self._limits.get(kernel.owner) if gpus > 0 else None
        if limit is None:
            return None
        held = sum(
            len(k.binding.device_indices)
            for k in self._kernels.values()
            if k.owner == kernel.owner and k.binding is not None
        )
        held += self._jobs.held_by(kernel.owner)
        if held + gpus <= limit:
            return None
        return (
            f"user {kernel.owner!r} holds {held} of their {limit} GPU(s) (quota) in other "
            "cells and jobs"
        )
