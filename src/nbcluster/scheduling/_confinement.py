"""Where a kernel's replicas may run: a host pool, a set of named hosts, or both.

The scheduler's placement helpers take one :class:`Confinement` instead of threading the
pool and the host names through every call; a kernel without either has ``ANYWHERE``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANYWHERE", "Confinement"]

#: Host names listed in a message before it says "and N more".
_NAMES_SHOWN = 4


@dataclass(frozen=True, slots=True)
class Confinement:
    """``pool``: only hosts of that pool (None: any pool or none). ``hosts``: only these host
    names (None: any name) — a kernelspec's ``remote_hosts``, resolved by the host provider."""

    pool: str | None = None
    hosts: frozenset[str] | None = None

    def admits(self, name: str, pool: str | None) -> bool:
        """Whether the host ``name`` of ``pool`` may run this kernel's replicas."""
        if self.pool is not None and pool != self.pool:
            return False
        return self.hosts is None or name in self.hosts

    @property
    def scalable(self) -> bool:
        """Whether asking the auto-scaler for hosts can help: its hosts join no pool, so
        only kernels without one (confined to named hosts or not) benefit."""
        return self.pool is None

    def __str__(self) -> str:
        """`` in pool 'a100'``, `` on hosts ssh-gpu1, ssh-gpu2``, both, or nothing: the
        words that follow "no host" in the scheduler's refusals."""
        words = ""
        if self.pool is not None:
            words += f" in pool {self.pool!r}"
        if self.hosts is not None:
            names = sorted(self.hosts)
            shown = ", ".join(names[:_NAMES_SHOWN])
            if len(names) > _NAMES_SHOWN:
                shown += f" and {len(names) - _NAMES_SHOWN} more"
            words += f" among hosts {shown}"
        return words


ANYWHERE = Confinement()
