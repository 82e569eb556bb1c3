"""Where new replicas go: a pure decision over a snapshot of host load.

The gateway builds :class:`HostLoad` snapshots from its registry and calls
:func:`choose_hosts`; nothing here does I/O or reads a clock. The GPU-aware resource model
and policies replace the load measure here when GPU binding lands.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["HostLoad", "PlacementError", "choose_hosts"]


class PlacementError(RuntimeError):
    """No placement satisfies the request; the text says what is missing."""


@dataclass(frozen=True, slots=True)
class HostLoad:
    name: str
    replicas: int
    gpus: int


def choose_hosts(hosts: Sequence[HostLoad], count: int, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct hosts for the replicas of one kernel, least loaded first.

    Load is the number of replicas a host runs per GPU it has (hosts without GPUs count as
    having one), ties broken by name so that the choice is deterministic.
    """
    excluded = set(exclude)
    candidates = [h for h in hosts if h.name not in excluded]
    if len(candidates) < count:
        raise PlacementError(
            f"{count} replica(s) need {count} distinct host(s); {len(candidates)} available"
        )
    ranked = sorted(candidates, key=lambda h: (h.replicas / max(h.gpus, 1), h.replicas, h.name))
    return [h.name for h in ranked[:count]]
