"""Conventions inside a cell's code that both the gateway and the replica read.

``%%cpu``: a cell whose first line that is neither blank nor a comment is ``%%cpu`` needs no
GPU. The gateway binds none to it and runs it at once (``gateway._execution.requested_gpus``);
the replica drops the line before IPython reads the cell (``kernel._gpus.strip_cpu_magic``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CPU_MAGIC", "cpu_magic_line"]

#: The first line of a cell that needs no GPU.
CPU_MAGIC = "%%cpu"


def cpu_magic_line(lines: Sequence[str]) -> int | None:
    """The index of the ``%%cpu`` line among a cell's lines, or None when the first line that
    is neither blank nor a comment is something else (or there is none)."""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return index if stripped.split(maxsplit=1)[0] == CPU_MAGIC else None
    return None
