"""Where a job's process runs: the runtime interface and the local-process runtime.

A worker (host daemon) picks the runtime a job names (``JobSpec.runtime``) and calls
:meth:`JobRuntime.start`; the handle it returns is awaited for the exit code and cancelled on
request. Every runtime writes the job's output (stdout and stderr, interleaved) to
``log_path`` as it comes, so that logs can be followed while the job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from .._lifeline import set_parent_death_signal
from ._model import JobSpec

__all__ = ["JobHandle", "JobRuntime", "ProcessRuntime", "job_argv"]


class JobHandle(Protocol):
    async def wait(self) -> int:
        """The exit code, once the job ended (negative: killed by that signal)."""
        ...

    async def cancel(self, grace: float = 5.0) -> None:
        """Stop the job: politely, then forcibly after ``grace`` seconds."""
        ...


class JobRuntime(Protocol):
    name: str

    def check(self, spec: JobSpec) -> None:
        """Raise ``ValueError`` naming the field if this runtime cannot run ``spec``."""
        ...

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        """Start the job; its working directory is ``workdir`` (inputs already there)."""
        ...


def job_argv(spec: JobSpec, workdir: Path, python: str = sys.executable) -> list[str]:
    """The argv of a job: its command, or the interpreter running its source (written to
    ``workdir/job.py``)."""
    if spec.command is not None:
        return list(spec.command)
    script = workdir / "job.py"
    script.write_text(spec.source or "")
    return [python, str(script)]


class _ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    async def wait(self) -> int:
        return await self._proc.wait()

    async def cancel(self, grace: float = 5.0) -> None:
        if self._proc.returncode is not None:
            return
        # The job runs in its own process group: children it started stop with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()


class ProcessRuntime:
    """Runs the job as a local process of the worker, in its own process group, no shell."""

    name = "process"

    def check(self, spec: JobSpec) -> None:
        if spec.workers > 1:
            raise ValueError("workers: the process runtime runs one worker per job")

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        argv = job_argv(spec, workdir)
        log_file = log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                # A job dies with its worker: a dead worker's job is run again elsewhere, and
                # must not go on beside its second run.
                preexec_fn=set_parent_death_signal,
            )
        except OSError as exc:
            log_file.close()
            raise ValueError(f"command: cannot start {argv[0]!r}: {exc.strerror}") from None
        log_file.close()  # the child has its own descriptor
        return _ProcessHandle(proc)
