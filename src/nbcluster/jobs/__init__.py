"""Batch jobs: cells and commands sent off the interactive path to CPU and GPU queues.

The model (:class:`JobSpec`, :class:`Job`), where jobs are kept (the :class:`JobStore`
contract; :func:`open_job_store` gives the file or Redis one), the pure queue decision
(:func:`assign_jobs`) and the runtimes a worker runs them with (:func:`optional_runtimes`
adds the container and Kubernetes ones).
"""

from ._filestore import FileJobStore, JobStoreError
from ._keys import input_key_allowed, input_prefix, job_prefix
from ._model import FAST_INPUT_LIMIT, TERMINAL, Job, JobLimits, JobResources, JobSpec
from ._optional import optional_runtimes
from ._queue import WorkerCapacity, assign_jobs
from ._runtime import JobHandle, JobRuntime, ProcessRuntime, job_argv
from ._store import JobStore, open_job_store

__all__ = [
    "FAST_INPUT_LIMIT",
    "TERMINAL",
    "FileJobStore",
    "Job",
    "JobHandle",
    "JobLimits",
    "JobResources",
    "JobRuntime",
    "JobSpec",
    "JobStore",
    "JobStoreError",
    "ProcessRuntime",
    "WorkerCapacity",
    "assign_jobs",
    "input_key_allowed",
    "input_prefix",
    "job_argv",
    "job_prefix",
    "open_job_store",
    "optional_runtimes",
]
