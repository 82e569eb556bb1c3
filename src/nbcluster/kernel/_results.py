"""What one capture or apply of :class:`~._sync.StateSynchronizer` did: returned to the
replica group (warnings to the user, logging) and to tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._environment import EnvironmentCapture
from ._payload import SyncPayload

__all__ = ["ApplyResult", "SyncResult"]


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What :meth:`StateSynchronizer.capture` found."""

    count: int
    #: The payload to replicate, or ``None`` when nothing changed.
    payload: SyncPayload | None
    #: Slots that just became unpicklable: warn the user about these now (sorted).
    unpicklable_new: tuple[str, ...] = ()
    #: Every slot that cannot be pickled at the moment (sorted).
    unpicklable: tuple[str, ...] = ()
    #: Slots not synchronised for another reason (object store failure): slot -> reason.
    failed: Mapping[str, str] = field(default_factory=dict)
    #: Slots that arrive, but not entirely (a traceback left out, sharing lost): slot -> why.
    lossy: Mapping[str, str] = field(default_factory=dict)
    #: Lossy slots that the replica taking over rebuilds by running the cell again (sorted).
    recomputable: tuple[str, ...] = ()
    #: Slots whose values went to the object store (sorted).
    stored: tuple[str, ...] = ()
    inline_bytes: int = 0
    stored_bytes: int = 0
    #: How many slots were examined (walked and pickled): the capture's real work.
    examined: int = 0
    #: Interpreter state and package installs of the cell.
    environment: EnvironmentCapture = field(default_factory=EnvironmentCapture)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`StateSynchronizer.apply` did."""

    count: int
    #: Slots whose values were loaded (sorted); values already held were not reloaded.
    loaded: tuple[str, ...] = ()
    #: Slots deleted (sorted).
    deleted: tuple[str, ...] = ()
    #: Slots dropped because the executor could not synchronise them (sorted).
    dropped: tuple[str, ...] = ()
    #: Slots that could not be applied: slot -> reason. Their old values are removed.
    failed: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0
