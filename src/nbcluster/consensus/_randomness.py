"""Keep pysyncobj off the user's random numbers.

pysyncobj draws its election timeouts and send delays from the ``random`` module's global
generator. In a kernel replica that generator is the notebook's: a cell's ``random.seed(42)``
followed by ``random.random()`` must give what it gives in a local kernel, and after a failover
the same continuation. Called once per process before a Raft node starts (by the replica
group); gives pysyncobj's modules a generator of their own.
"""

from __future__ import annotations

import random
import sys

__all__ = ["private_random_for_pysyncobj"]

_MODULES = ("pysyncobj.syncobj", "pysyncobj.transport", "pysyncobj.dns_resolver")


def private_random_for_pysyncobj() -> None:
    """Point the ``random`` name of pysyncobj's modules at a private ``random.Random`` (it
    has the module's functions as methods). Idempotent."""
    import pysyncobj  # noqa: F401  # loads the modules below

    private = random.Random()
    for name in _MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "random", None) is random:
            module.random = private  # type: ignore[attr-defined]
