"""Retry with exponential backoff, shared by the network backends (``_redis``, ``_s3``).

Each backend wraps one round trip (one idempotent request) in :func:`retrying`, naming what it
does; a transient error (the backend says which exception types those are) is retried a few
times with growing delays, then turned into a :class:`~nbcluster.store.StoreError` that names
the operation and the last error. Any other exception passes through unchanged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from ._interface import StoreError

__all__ = ["retrying"]

T = TypeVar("T")

#: Jitter comes from a generator of our own: the stores run inside kernel replicas, where the
#: ``random`` module's global generator is the user's (``random.seed(0)`` must give the same
#: sequence as in a local kernel).
_jitter = random.Random()


def retrying(
    what: str,
    call: Callable[[], T],
    transient: tuple[type[BaseException], ...],
    attempts: int = 4,
    first_delay: float = 0.05,
    error: type[Exception] = StoreError,
) -> T:
    """Return ``call()``, calling it again (up to ``attempts`` calls in all) while it raises one
    of ``transient``, sleeping ``first_delay``, then twice that, ... (with jitter) in between.

    When the attempts run out, raise ``error`` (:class:`StoreError` unless the caller keeps
    other things, as the job store does) ``"{what} failed after N attempts:
    {last error}"`` chained to the last error, so ``what`` should say what was done where, e.g.
    ``"reading object 'k' from redis://host:6379/0"``.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except transient as exc:
            if attempt == attempts:
                raise error(
                    f"{what} failed after {attempts} attempt{'s' if attempts > 1 else ''}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        time.sleep(delay * _jitter.uniform(0.5, 1.0))
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover
