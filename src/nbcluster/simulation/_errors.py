"""The one error a bad trace raises: which file, which line, and what is wrong there."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TraceError"]


class TraceError(ValueError):
    """A trace that cannot be replayed. The readers raise it (``nbcluster simulate`` prints
    it and exits 2); ``line`` is 1-based, None when the problem is the file as a whole."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")
