"""Batch jobs: cells and commands sent off the interactive path to CPU and GPU queues.

The model (:class:`JobSpec`, :class:`Job`), where jobs are kept (:class:`JobStore`), the pure
queue decision (:func:`assign_jobs`) and the runtimes a worker runs them with.
"""

from ._model import FAST_INPUT_LIMIT, TERMINAL, Job, JobResources, JobSpec
from ._queue import WorkerCapacity, assign_jobs
from ._runtime import JobHandle, JobRuntime, ProcessRuntime, job_argv
from ._store import JobStore

__all__ = [
    "FAST_INPUT_LIMIT",
    "TERMINAL",
    "Job",
    "JobHandle",
    "JobResources",
    "JobRuntime",
    "JobSpec",
    "JobStore",
    "ProcessRuntime",
    "WorkerCapacity",
    "assign_jobs",
    "job_argv",
]
