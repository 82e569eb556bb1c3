"""Where a job's objects live in the object store, and which keys a job may read.

Uploads (``POST /api/jobs/inputs``) go under their uploader's prefix, outputs under the job's
own. A job may name as inputs only its owner's uploads and its owner's jobs' outputs: keys of
kernels (their checkpoints and values) and of other users are not for jobs to read."""

from __future__ import annotations

from collections.abc import Container

__all__ = ["input_key_allowed", "input_prefix", "job_prefix"]


def input_prefix(owner: str) -> str:
    return f"jobs/inputs/{owner}/"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def input_key_allowed(key: str, owner: str, owned_jobs: Container[str]) -> bool:
    """Whether a job of ``owner`` may read ``key``; ``owned_jobs``: ids of ``owner``'s jobs."""
    if key.startswith(input_prefix(owner)):
        return True
    head, _, rest = key.partition("/")
    job_id, _, name = rest.partition("/")
    return head == "jobs" and job_id != "inputs" and bool(name) and job_id in owned_jobs
