"""What a live view draws, in one answer (the contract of ``GET /api/cluster/overview`` and the
event stream's ``overview`` frames): built by the gateway (``gateway/_overview.py``), read by
the dashboard and ``nbcluster top``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from ..jobs import Job

__all__ = ["ClusterOverview", "GpuTotals"]


class GpuTotals(BaseModel):
    """The cluster's GPUs as the scheduler counts them (admins only)."""

    hosts: int
    gpu_capacity: int
    committed_gpus: int
    pending_gpus: int
    waiting_cells: int
    #: Replicas' GPU requests placed on hosts over the GPUs those hosts have.
    subscription_ratio: float


class ClusterOverview(BaseModel):
    """One snapshot for one caller. Entries of ``hosts``, ``kernels``, ``workers`` and
    ``queues`` have the shapes of ``GET /api/cluster/hosts``, ``/api/cluster/kernels``,
    ``/api/jobs/workers`` and ``/api/jobs/stats``."""

    time: datetime
    user: str
    admin: bool
    #: The newest notice's ``seq`` when it was made.
    last_seq: int
    totals: GpuTotals | None = None
    hosts: list[dict[str, Any]] = Field(default_factory=list)
    kernels: list[dict[str, Any]] = Field(default_factory=list)
    jobs: list[Job] = Field(default_factory=list)
    queues: dict[str, Any] = Field(default_factory=dict)
    workers: list[dict[str, Any]] = Field(default_factory=list)
