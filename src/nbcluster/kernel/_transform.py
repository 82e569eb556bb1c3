"""One IPython transform per cell on the executor.

The executor needs a cell's source as IPython compiles it (magics turned into calls) three
times: for the bound names of its ``lead`` record (before the election), in ipykernel's
``do_execute`` and again in IPython's ``run_cell`` (both before the code runs), and for the
capture after the reply. Each transform tokenises the cell; together they were about 8 % of
the executor's main thread for a ``1+1`` cell (``docs/provisioner.md``, "Figures"), on a path
the user waits for.

:class:`TransformOnce` replaces the shell's ``transform_cell``. The kernel calls
:meth:`TransformOnce.prepare` before the election; ipykernel's and IPython's calls for the
same source that follow get that result instead of transforming again, until the kernel
calls :meth:`TransformOnce.forget`: once the cell has run, at the next request, and when the
namespace may have changed in between (an earlier cell's state arrived while this one
waited), because the transform of a single-line cell depends on the namespace (IPython's
automagic and autocall look names up). IPython then transforms the cell itself, as without
this class.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TransformOnce"]


class TransformOnce:
    """The shell's ``transform_cell``, remembered for one source until forgotten. Created by
    ``ReplicaKernel`` with its shell; all calls come from the kernel's main thread."""

    def __init__(self, shell: Any) -> None:
        self._transform = shell.transform_cell
        self._prepared: tuple[str, str] | None = None
        shell.transform_cell = self.transform_cell

    def prepare(self, code: str) -> str | None:
        """Transform ``code`` now and keep the result for :meth:`transform_cell`; None
        (nothing kept) if IPython cannot transform it."""
        try:
            transformed = str(self._transform(code))
        except Exception:
            self._prepared = None
            return None
        self._prepared = (code, transformed)
        return transformed

    def forget(self) -> None:
        """Drop what :meth:`prepare` kept: the next call transforms again."""
        self._prepared = None

    def transform_cell(self, raw_cell: str) -> str:
        """What the shell's ``transform_cell`` returns: the prepared result if it is for this
        very source, else a fresh transform."""
        prepared = self._prepared
        if prepared is not None and prepared[0] == raw_cell:
            return prepared[1]
        return str(self._transform(raw_cell))
