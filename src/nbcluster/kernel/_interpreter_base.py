"""The shared pieces of the interpreter-state probes: the :data:`NOT_APPLICABLE` sentinel,
:class:`Lossy`, the two errors, the :class:`InterpreterProbe` protocol, and the value helpers
the probes use.

Nothing calls this module directly at run time: :mod:`nbcluster.kernel._interpreter` (the
framework that the replica's state synchronisation calls after and between cells) re-exports
its public names, and the probe modules :mod:`nbcluster.kernel._interpreter_probes` and
:mod:`nbcluster.kernel._interpreter_ipython` use its helpers in their ``capture`` (on the
executor, after every cell) and ``restore`` (on the other replicas, when they apply a cell's
state update). It lives apart so that the probes and the framework share these pieces without
importing each other.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import UnionType
from typing import Any, Final, Protocol

__all__ = [
    "NOT_APPLICABLE",
    "InterpreterProbe",
    "InterpreterRestoreError",
    "InterpreterStateError",
    "Lossy",
]


class _NotApplicable:
    """Type of :data:`NOT_APPLICABLE`; one instance."""

    _instance: _NotApplicable | None = None

    def __new__(cls) -> _NotApplicable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_APPLICABLE"


NOT_APPLICABLE: Final = _NotApplicable()
"""What :meth:`InterpreterProbe.capture` returns when its state does not exist in this process
(NumPy or torch not imported, no IPython shell); :func:`capture_all` leaves the probe out."""


@dataclass(frozen=True, slots=True)
class Lossy:
    """What a probe's capture returns when part of the state cannot travel.

    ``value`` is the transferable part (or :data:`NOT_APPLICABLE` when nothing is);
    ``problems`` name what stays on this replica, one sentence each, the same text for as long
    as the condition holds (so that a caller can tell the user once).
    """

    value: object
    problems: tuple[str, ...]


class InterpreterRestoreError(Exception):
    """A probe could not make this process's state equal to the captured one; the message is a
    sentence for the user (without the probe's name)."""


class InterpreterStateError(ValueError):
    """Encoded interpreter state could not be decoded; the message names the problem."""


class InterpreterProbe(Protocol):
    """One piece of interpreter state: how to read it as plain data and how to write it back.

    ``shell`` is IPython's ``InteractiveShell`` (or ``None`` outside a kernel: probes that do
    not need it ignore it, the others report :data:`NOT_APPLICABLE`).
    """

    @property
    def name(self) -> str:
        """The key of this probe's value in a captured state."""
        ...

    def capture(self, shell: Any) -> object:
        """Plain data, :data:`NOT_APPLICABLE` or a :class:`Lossy`; cheap: runs after every cell."""
        ...

    def restore(self, shell: Any, value: object) -> None:
        """Make this process's state equal to ``value`` (a capture from another replica).

        Raises :class:`InterpreterRestoreError` (or any exception) when it cannot.
        """
        ...


# ---------------------------------------------------------------------------------------------
# Value checks shared by the probes' restore: a value comes from another process (through the
# log), so its shape is checked before it is applied, and a bad one is named, not obeyed.


def _expect(value: object, kind: type | UnionType, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InterpreterRestoreError(f"expected {what}, got {type(value).__name__}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_PLAIN_SCALARS: Final = (type(None), bool, int, float, str, bytes)


def _plain(value: object) -> tuple[bool, object]:
    """``(True, copy as plain data)`` for values built of plain data, ``(False, None)`` else.

    Used for values that are not ours (``%config`` values, NumPy print options): ``str``
    subclasses (traitlets' ``DeferredConfigString``) become ``str``, sets become sorted lists
    (traitlets' container traits accept lists), other types are not plain.
    """
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True, value
    if isinstance(value, str):
        return True, str(value)
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            ok, plain = _plain(item)
            if not ok:
                return False, None
            items.append(plain)
        return True, (items if isinstance(value, list) else tuple(items))
    if isinstance(value, set | frozenset):
        ok, members = _plain(list(value))
        if not ok:
            return False, None
        assert isinstance(members, list)
        try:
            members.sort(key=lambda v: (type(v).__name__, v))
        except TypeError:
            members.sort(key=repr)
        return True, members
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            ok_key, plain_key = _plain(key)
            ok, plain = _plain(item)
            if not (ok and ok_key) or isinstance(plain_key, list | dict):
                return False, None
            out[plain_key] = plain
        return True, out
    return False, None


# ---------------------------------------------------------------------------------------------
# Optional libraries (NumPy, torch)


def _loaded(module: str) -> Any:
    """The module if this process has imported it, else ``None``; probes of optional libraries
    never import one themselves at capture (an import per cell would cost seconds)."""
    return sys.modules.get(module)


def _importing(module: str) -> Any:
    """The module, imported if needed: a value from the executor means it had imported it, and
    the follower does the same to hold the same state (it will import it anyway to load the
    globals that use it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InterpreterRestoreError(f"{module} cannot be imported on this host ({exc})") from None
