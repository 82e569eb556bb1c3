"""Running one package command on this replica's host, the way IPython's magics would.

Followers call :func:`run_package_command` when they apply a cell's record (decoded by
:mod:`nbcluster.kernel._package_encode`), a joining replica for every recorded command in log
order; it blocks, so they call it off the kernel's event loop. It runs pip (or ``uv pip``) with
the kernel's own interpreter and conda (mamba, micromamba) into the kernel's prefix, without a
shell, with a timeout, and never raises: the :class:`PackageResult` says what happened and
where.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ._package_parse import CONDA_ACTIONS, PIP_ACTIONS, PackageCommand, _action_index, redact

#: How many characters of a command's output a result keeps.
TAIL_CHARS = 2000


@dataclass(frozen=True, slots=True)
class PackageResult:
    """What :func:`run_package_command` did on one host.

    ``returncode`` is None when nothing ran (``error`` says why: not replayable, conda missing,
    the program could not be started). ``output`` is the tail of stdout and stderr together.
    ``environment`` is the interpreter (pip) or prefix (conda) that was changed.
    """

    command: PackageCommand
    host: str
    environment: str
    returncode: int | None
    output: str
    duration: float
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for the cell: where the command ran and how it ended."""
        what = self.command.describe()
        if self.ok:
            return f"{what}: done on {self.host} ({self.environment}, {self.duration:.1f} s)"
        if self.timed_out:
            return f"{what}: timed out on {self.host} after {self.duration:.1f} s"
        if self.returncode is None:
            return f"{what}: not run on {self.host}: {self.error}"
        last = self.output.strip().splitlines()[-1:] or [""]
        return f"{what}: failed on {self.host} (exit {self.returncode}) {last[0]}".rstrip()


_CONDA_YES = frozenset({"-y", "--yes"})
_CONDA_ENV = frozenset({"-p", "--prefix", "-n", "--name"})


@dataclass(frozen=True, slots=True)
class _Plan:
    argv: list[str] = field(default_factory=list)
    environment: str = ""
    error: str | None = None


def run_package_command(
    command: PackageCommand,
    *,
    timeout: float,
    python: str | None = None,
    prefix: str | None = None,
    tail_chars: int = TAIL_CHARS,
) -> PackageResult:
    """Run ``command`` on this host, as IPython's ``%pip`` / ``%conda`` magics would in this
    kernel, and return what happened; never raises.

    pip runs as ``[python, "-m", "pip", *args]`` (``python``: this kernel's interpreter unless
    given), so the kernel's own environment changes; ``uninstall`` gets ``-y`` (the executor's
    run was confirmed, and nobody can answer a prompt here). uv runs as ``[python, "-m", "uv",
    "pip", *args]``, as IPython's ``%uv`` does. conda (or mamba / micromamba, as
    typed; conda if that is missing) gets ``--yes``, and, for the ``%conda`` magic, ``--prefix``
    of this kernel (``prefix``: ``sys.prefix`` unless given). No shell; stdin is closed; the
    whole process group is killed after ``timeout`` seconds. Output is kept on disk while the
    command runs and only its last ``tail_chars`` characters are read back.

    Followers call it when they apply a cell's record, joining replicas for every recorded
    command in log order. Blocking: call it off the kernel's event loop.
    """
    host = socket.gethostname()
    python = python or sys.executable
    prefix = prefix or sys.prefix
    started = time.monotonic()
    plan = _plan(command, python, prefix, host)
    if plan.error is not None:
        return PackageResult(command, host, plan.environment, None, "", 0.0, error=plan.error)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    timed_out = False
    with tempfile.TemporaryFile() as sink:
        try:
            process = subprocess.Popen(
                plan.argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills builds too
            )
        except (OSError, ValueError) as exc:
            return PackageResult(
                command,
                host,
                plan.environment,
                None,
                "",
                time.monotonic() - started,
                error=f"could not start {plan.argv[0]}: {exc}",
            )
        try:
            returncode = process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            returncode = process.wait()
        duration = time.monotonic() - started
        output = _tail(sink, tail_chars)
    if returncode == 0 and not timed_out:
        # A module installed just now must be importable by the next cell: the import
        # system caches directory listings.
        importlib.invalidate_caches()
    return PackageResult(
        command,
        host,
        plan.environment,
        returncode,
        output,
        duration,
        timed_out=timed_out,
        error=f"timed out after {timeout:g} s" if timed_out else None,
    )


def _plan(command: PackageCommand, python: str, prefix: str, host: str) -> _Plan:
    if command.not_replayable is not None:
        return _Plan(environment=python, error=f"not replayable: {command.not_replayable}")
    args = list(command.args)
    index = _action_index(command.tool, args)
    if index is None or args[index] not in (
        PIP_ACTIONS if command.tool == "pip" else CONDA_ACTIONS
    ):
        return _Plan(environment=python, error=f"not an install: {command.describe()}")
    if any("\x00" in arg for arg in args):
        return _Plan(environment=python, error="an argument contains a NUL character")
    if command.tool == "pip":
        if command.program == "uv":  # uv never prompts, and has no `-y`
            return _Plan([python, "-m", "uv", "pip", *args], python)
        if args[index] == "uninstall" and not {"-y", "--yes"} & set(args):
            args.append("-y")
        return _Plan([python, "-m", "pip", *args], python)
    executable = _conda_executable(command.program, python)
    if executable is None:
        return _Plan(
            environment=prefix,
            error=f"{command.program} is not available on {host} (no executable found)",
        )
    extra = [] if _CONDA_YES & set(args) else ["--yes"]
    if command.magic:
        if not Path(prefix, "conda-meta", "history").exists():
            return _Plan(
                environment=prefix,
                error=f"the kernel's environment on {host} ({prefix}) is not a conda environment",
            )
        if not _CONDA_ENV & {arg.split("=", 1)[0] for arg in args}:
            extra += ["--prefix", prefix]
    argv = [executable, *args[: index + 1], *extra, *args[index + 1 :]]
    default = os.environ.get("CONDA_PREFIX", "the default conda environment")
    return _Plan(argv, prefix if command.magic else default)


def _conda_executable(program: str, python: str) -> str | None:
    """Where IPython's conda magics look: ``CONDA_EXE`` / ``MAMBA_EXE``, next to the
    interpreter, then ``PATH``; mamba and micromamba fall back to conda."""
    names = [program] if program == "conda" else [program, "conda"]
    for name in names:
        variable = "MAMBA_EXE" if "mamba" in name else "CONDA_EXE"
        candidates = [os.environ.get(variable, ""), str(Path(python).parent / name)]
        for candidate in candidates:
            if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
                return candidate
        found = shutil.which(name)
        if found:
            return found
    return None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def _tail(sink: IO[bytes], chars: int) -> str:
    # Up to 4 bytes a character in UTF-8: read enough bytes for `chars` characters.
    size = sink.seek(0, os.SEEK_END)
    sink.seek(max(0, size - 4 * chars))
    text: str = sink.read().decode("utf-8", errors="replace")
    return redact(text[-chars:]) if chars > 0 else ""
