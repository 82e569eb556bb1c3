"""The queue of cells waiting for GPUs, and serving it when GPUs may have come free.

:class:`._state.Scheduler` owns one :class:`WaitingQueue`: it appends a cell that cannot
bind at its ``ExecutionRequested``, puts back at the head a cell that was bound but never
started, removes cells that end or are cancelled, and calls :meth:`WaitingQueue.serve` after
every event that may have freed GPUs. Each kernel also lists its own waiting terms, oldest
first (``Kernel.waiting``): its cells run in order, so only its oldest one may start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ._actions import Action
from ._binding import Binder
from ._hosts import HostIndex
from ._model import Kernel, Wait

__all__ = ["WaitingQueue"]


class WaitingQueue:
    """Waiting cells, FIFO by ``Wait.seq``."""

    def __init__(self) -> None:
        # Keyed by (kernel id, term) so that a wait leaves it in O(1); and the kernels with a
        # waiting cell, so that serving looks only at each kernel's oldest cell.
        self._waits: dict[tuple[str, int], Wait] = {}
        self._kernels: dict[str, None] = {}
        self._tail_seq = 0
        self._head_seq = 1

    def __len__(self) -> int:
        return len(self._waits)

    def get(self, kernel_id: str, term: int) -> Wait | None:
        return self._waits.get((kernel_id, term))

    @property
    def order(self) -> tuple[tuple[str, int], ...]:
        """``(kernel_id, term)`` of every waiting cell, in queue order."""
        ordered = sorted(self._waits.values(), key=lambda w: w.seq)
        return tuple((w.kernel_id, w.term) for w in ordered)

    def append(self, kernel: Kernel, term: int, preferred: str | None, gpus: int | None) -> None:
        """Queue a new cell at the tail."""
        kernel.waiting.append(term)
        self._tail_seq += 1
        self._enqueue(Wait(kernel.kernel_id, term, preferred, gpus, self._tail_seq))

    def requeue(self, kernel: Kernel, term: int) -> None:
        """Put a cell that was bound but never started back at the head of the queue."""
        if term not in kernel.waiting:
            kernel.waiting.insert(0, term)
            self._head_seq -= 1
            gpus = kernel.cell_gpus.get(term)
            self._enqueue(Wait(kernel.kernel_id, term, None, gpus, self._head_seq))

    def remove(self, kernel: Kernel, term: int) -> None:
        kernel.waiting.remove(term)
        del self._waits[(kernel.kernel_id, term)]
        if not kernel.waiting:
            del self._kernels[kernel.kernel_id]

    def _enqueue(self, wait: Wait) -> None:
        self._waits[(wait.kernel_id, wait.term)] = wait
        self._kernels[wait.kernel_id] = None

    def serve(
        self,
        kernels: Mapping[str, Kernel],
        index: HostIndex,
        binder: Binder,
        over_quota: Callable[[Kernel, int], str | None],
    ) -> list[Action]:
        """Give waiting cells, oldest first, whatever GPUs are free now.

        Decides exactly as trying every queued cell in queue order would, but looks only at
        each waiting kernel's oldest cell (a later one never starts before it) and tries only
        those that :meth:`Binder.may_bind` admits: during a retry free devices only shrink, so
        a cell that cannot bind at its start cannot bind later in it. Cost: O(waiting kernels)
        per event, not O(waiting cells) (issue 18: ``batch`` queues thousands of cells)."""
        actions: list[Action] = []
        if not self._kernels:
            return actions
        most_free = index.most_free()
        candidates: list[tuple[Wait, Kernel, int]] = []
        for kernel_id in self._kernels:
            kernel = kernels[kernel_id]
            if kernel.binding is not None:
                continue
            wait = self._waits[(kernel_id, kernel.waiting[0])]
            gpus = kernel.request.gpus if wait.gpus is None else wait.gpus
            if gpus <= most_free and binder.may_bind(kernel, gpus):
                candidates.append((wait, kernel, gpus))
        candidates.sort(key=lambda c: c[0].seq)
        for wait, kernel, gpus in candidates:
            if gpus > most_free:
                continue  # cheap skip: no host has that many idle GPUs
            if over_quota(kernel, gpus) is not None:
                continue
            bound = binder.try_bind(kernel, wait.term, wait.preferred, gpus)
            if bound is not None:
                self.remove(kernel, wait.term)
                actions += bound
                most_free = index.most_free()
        return actions
