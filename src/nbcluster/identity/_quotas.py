"""Per-user quotas, as pure checks the gateway makes before it starts a kernel or queues a
job. The message of a refusal names the limit and what the user holds."""

from __future__ import annotations

from ._users import Quotas

__all__ = ["QuotaExceeded", "check_gpus", "check_kernels"]


class QuotaExceeded(Exception):
    """``status``: 429 when waiting (stopping something) would make room, 403 when the request
    can never fit the quota."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_kernels(user: str, quotas: Quotas, running: int) -> None:
    if quotas.kernels is not None and running >= quotas.kernels:
        raise QuotaExceeded(
            f"user {user!r} has {running} kernel(s) running, the quota is {quotas.kernels} "
            "(quotas.kernels): shut one down first",
            429,
        )


def check_gpus(user: str, quotas: Quotas, committed: int, requested: int, what: str) -> None:
    """``committed``: GPUs the user's cells and jobs hold now; ``requested``: what ``what``
    asks for."""
    limit = quotas.gpus
    if limit is None or requested <= 0:
        return
    if requested > limit:
        raise QuotaExceeded(
            f"{what} asks for {requested} GPU(s), over user {user!r}'s quota of {limit} "
            "(quotas.gpus)",
            403,
        )
    if committed + requested > limit:
        raise QuotaExceeded(
            f"{what} asks for {requested} GPU(s) while user {user!r} holds {committed} of "
            f"their quota of {limit} (quotas.gpus): wait for a cell or job to finish",
            429,
        )
