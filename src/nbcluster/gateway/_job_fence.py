"""The fence on workers' job events, pure: which run of a job a worker may speak for, why any
other is refused, and the :class:`Verdict` the host endpoint carries out.

Every start of a job is a new attempt (``Job.attempts``); a worker tags a run's output and end
with it. The job manager (``_jobs``) hears an event only when :func:`is_current_run` holds
(the job runs, on that worker, under that attempt); anything else is dropped, counted under
:func:`refusal_reason` and answered with a ``Verdict`` that stops the run. The host endpoint
(``_host_endpoint``) acts on the verdicts the manager returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..hostproto import JobOutputAck
from ..jobs import Job

__all__ = ["Verdict", "is_current_run", "refusal_reason"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the host endpoint does about an event of a worker: answer with ``ack``, or, when
    the event was refused, ask the worker to stop the run (``stop``: its job and attempt)."""

    ack: JobOutputAck | None = None
    stop: tuple[str, int | None] | None = None


def is_current_run(job: Job, host: str, attempt: int) -> bool:
    """Whether ``attempt`` on ``host`` is the job's current run (attempt 0: a host that does
    not say, taken as the current one)."""
    if job.status != "running" or job.worker != host:
        return False
    return not (attempt and attempt != job.attempts)


def refusal_reason(job: Job | None, host: str, attempt: int) -> Literal["foreign", "stale"]:
    """Why an event of a run that is not the job's current one is refused: ``stale`` (an
    earlier attempt, or the job's worker speaking of a run it no longer has), ``foreign`` (no
    such job, or a host the job is not on)."""
    if job is None:
        return "foreign"
    if attempt and attempt < job.attempts:
        return "stale"
    if job.worker != host:
        return "foreign"
    return "stale"
