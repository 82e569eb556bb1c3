"""The one owner of background tasks: what a component starts and does not await itself.

asyncio keeps only a weak reference to a task, so a task nobody holds can be collected while
it runs, and an exception nobody retrieves is reported late (at garbage collection) or never.
:class:`BackgroundTasks` holds each task until it ends, logs its exception when it ends with
one, forgets it then, and on :meth:`~BackgroundTasks.close` cancels those still running and
waits for them: an ``asyncio.TaskGroup`` for tasks that are started from callbacks and whose
failures must not take their siblings down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["BackgroundTasks"]

T = TypeVar("T")

_log = logging.getLogger(__name__)


class BackgroundTasks:
    """Tasks owned by one component (``owner`` names it in log lines and task names)."""

    def __init__(self, owner: str, log: logging.Logger | None = None) -> None:
        self.owner = owner
        self._log = log if log is not None else _log
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, name: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task named ``<owner>: <name>``, held until it ends. Its result
        is the caller's to await if it wants; an exception nobody awaits is logged. After
        :meth:`close`, or outside a running event loop, ``coro`` is closed unrun and
        ``RuntimeError`` raised."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner}: closed, cannot start {name}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise
        task = loop.create_task(coro, name=f"{self.owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("%s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(tuple(self._tasks))

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, timeout: float | None = 10.0) -> None:
        """Cancel every task still running and wait (up to ``timeout`` seconds) for them to
        end; a task that outlives the wait is named in the log. Later :meth:`spawn` calls
        raise."""
        self._closed = True
        await self.cancel_all(timeout)

    async def cancel_all(self, timeout: float | None = 10.0) -> None:
        """Cancel every task running now and wait for them (as :meth:`close`, but new tasks
        may be started afterwards)."""
        # A task of this owner that closes it is not cancelled, nor waited for, by itself.
        current = asyncio.current_task()
        waiting = [t for t in self._tasks if t is not current]
        if not waiting:
            return
        for task in waiting:
            task.cancel()
        _, pending = await asyncio.wait(waiting, timeout=timeout)
        for task in pending:
            self._log.warning(
                "%s did not stop within %s s of being cancelled", task.get_name(), timeout
            )
