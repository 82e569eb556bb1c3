"""What a user reads about a cell that waits for GPUs, pure: the lines the scheduler driver
(``_driver``) shows in the cell's output and the text of its ``cell_waited`` notice.

The driver calls these as it carries out the scheduler's actions: :func:`waiting_text` for a
``WaitForGpus``, :func:`evicted_text`, :func:`granted_text` and :func:`waited_notice` when a
cell that waited is bound (``BindGpus``), :func:`migration_failed_text` when moving a replica
for a cell failed too often.
"""

from __future__ import annotations

from ..scheduling import GIB, BindGpus, ClusterSummary, EvictionWait, WaitForGpus

__all__ = [
    "evicted_text",
    "granted_text",
    "migration_failed_text",
    "waited_notice",
    "waiting_text",
]


def _plural(n: int, word: str) -> str:
    """``1 GPU``, ``2 GPUs``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _devices(indices: tuple[int, ...]) -> str:
    return ", ".join(map(str, indices))


def waiting_text(wait: WaitForGpus, summary: ClusterSummary) -> str:
    """Why the cell waits (``summary``: the cluster now)."""
    if wait.gpus == 0:
        return (
            f"[nbcluster] Waiting for a replica: {wait.reason}. The cell runs as soon as "
            "one is back; interrupt the kernel to cancel.\n"
        )
    return (
        f"[nbcluster] Waiting for {_plural(wait.gpus, 'GPU')}: {wait.reason} "
        f"({summary.committed_gpus} of {summary.gpu_capacity} GPUs in the cluster are "
        "in use). The cell runs as soon as they are free; interrupt the kernel to "
        "cancel.\n"
    )


def evicted_text(moved: EvictionWait) -> str:
    """The cell's GPUs were freed by moving what another cell kept on them to the host."""
    whose = "another kernel" if moved.others else "this kernel's previous cell"
    return (
        f"[nbcluster] waited {moved.seconds:.1f} s for "
        f"{'GPU' if len(moved.devices) == 1 else 'GPUs'} {_devices(moved.devices)} to be "
        f"freed by {whose} ({moved.freed_bytes / GIB:.1f} GB moved)\n"
    )


def _bound(bind: BindGpus) -> tuple[str, str]:
    """``2 GPUs`` and ``0, 1``: how many GPUs a binding has, and which."""
    return _plural(len(bind.device_indices), "GPU"), _devices(bind.device_indices)


def granted_text(bind: BindGpus, waited: float) -> str:
    """The cell got its GPUs after ``waited`` seconds and runs now."""
    gpus, devices = _bound(bind)
    where = f"on {bind.host} after {waited:.1f} s"
    return f"[nbcluster] Got {gpus} ({devices}) {where}; running the cell.\n"


def waited_notice(bind: BindGpus, waited: float) -> str:
    """The text of the ``cell_waited`` notice."""
    gpus, devices = _bound(bind)
    cell = f"kernel {bind.kernel_id}: cell {bind.term}"
    return f"{cell} waited {waited:.1f} s for {gpus} ({devices} on {bind.host})"


def migration_failed_text(bind: BindGpus, attempts: int) -> str:
    """The error of a cell whose replica could not be moved to its GPUs' host."""
    return (
        f"no replica's host has {_plural(len(bind.device_indices), 'free GPU')} and "
        f"moving a replica to host {bind.host} failed {attempts} times; "
        "see the gateway log. Run the cell again."
    )
