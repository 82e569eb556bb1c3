"""A replica's membership in its kernel's replica group: the Raft log, the coordinator that
turns committed records into decisions, and the synchroniser that moves Python state.

Created by :class:`~._kernel.ReplicaKernel` when the gateway asks it to join (on the kernel's
main event loop, where cells run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._records import Done, Mark, Proposal, encode_record
from ._replication import ReplicaCoordinator

if TYPE_CHECKING:
    from ..consensus import ReplicatedLog
    from ._kernel import ReplicaKernel

__all__ = ["ReplicaGroup"]

log = logging.getLogger(__name__)

PROPOSE_TIMEOUT = 10.0


class ReplicaGroup:
    def __init__(self, kernel: ReplicaKernel, coordinator: ReplicaCoordinator, sync: Any) -> None:
        self.kernel = kernel
        self.coordinator = coordinator
        self.sync = sync
        self.log: ReplicatedLog = None  # type: ignore[assignment]  # set by start()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned: set[str] = set()

    @classmethod
    async def start(
        cls,
        kernel: ReplicaKernel,
        *,
        address: str,
        peers: list[str],
        members: int,
        password: str,
        store_url: str | None,
    ) -> ReplicaGroup:
        from ..consensus import PySyncObjLog
        from ..store import open_store
        from ._sync import StateSynchronizer

        loop = asyncio.get_running_loop()
        shell = kernel.shell
        assert shell is not None
        store = open_store(store_url or (Path.cwd() / ".nbcluster-store").as_uri())
        # One key space per kernel, so that a kernel's objects go when it does (store gc).
        prefix = f"kernels/{kernel.kernel_id}/values/" if kernel.kernel_id else "values/"
        sync = StateSynchronizer(shell.user_ns, set(shell.user_ns_hidden), store, key_prefix=prefix)
        group: ReplicaGroup
        coordinator = ReplicaCoordinator(
            kernel.replica_id, members, loop, lambda p, n: group.apply_state(p, n)
        )
        group = cls(kernel, coordinator, sync)
        group.log = PySyncObjLog(address, [p for p in peers if p != address], password, coordinator)
        return group

    async def wait_for_leader(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.log.status().get("leader"):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no Raft leader among the replicas after {timeout:g} s")
            await asyncio.sleep(0.02)

    async def catch_up(self, timeout: float) -> None:
        """Return once this replica has applied every record committed before now."""
        await self.log.propose(
            encode_record(Mark(self.kernel.replica_id, uuid.uuid4().hex)), timeout
        )

    async def change_members(self, remove: list[str], add: list[str], timeout: float) -> None:
        """Raft membership changes, one at a time: first drop the dead, then add the new."""
        for address in remove:
            if address in self.log.status().get("members", ()):
                await self.log.remove_member(address, timeout)
        for address in add:
            if address not in self.log.status().get("members", ()):
                await self.log.add_member(address, timeout)

    async def elect(self, proposal: Proposal) -> str | None:
        """Propose and return the committed winner of the proposal's term and attempt."""
        await self.log.propose(encode_record(proposal), PROPOSE_TIMEOUT)
        return await self.coordinator.decision(proposal.term, proposal.attempt, PROPOSE_TIMEOUT)

    def finish(self, term: int, status: str, execution_count: int, code: str) -> None:
        """After the executor replied: capture the cell's effect now (before the next cell can
        change it) and append it to the log in the background."""
        filename = self._cell_filename(code, execution_count)
        try:
            result = self.sync.capture(execution_count, code, filename)
        except Exception:
            log.exception("could not capture the state of term %d", term)
            result = None
        payload = getattr(result, "payload", None)
        unpicklable = [n for n in getattr(result, "unpicklable_new", ()) if n not in self._warned]
        if unpicklable:
            self._warned.update(unpicklable)
            self.kernel.send_stream_warning(
                "[nbcluster] these variables cannot be copied to the other replicas and will "
                f"not survive a failover: {', '.join(sorted(unpicklable))}\n"
            )
        from ._sync import encode_payload

        record = Done(
            term,
            self.kernel.replica_id,
            status,
            execution_count,
            encode_payload(payload) if payload else None,
        )
        task = asyncio.create_task(self._propose_done(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cell_filename(self, code: str, execution_count: int) -> str:
        compiler = getattr(self.kernel.shell, "compile", None)
        get_name = getattr(compiler, "get_code_name", None)
        if get_name is None:
            return "<cell>"
        with contextlib.suppress(Exception):
            return str(get_name(code, code, execution_count))
        return "<cell>"

    async def _propose_done(self, record: Done) -> None:
        try:
            await self.log.propose(encode_record(record), PROPOSE_TIMEOUT)
        except Exception as exc:
            log.error("could not replicate the state of term %d: %s", record.term, exc)

    def apply_state(self, payload: dict[str, Any] | None, count: int) -> None:
        """A follower applies another replica's cell (or a snapshot's full state)."""
        if payload is not None:
            try:
                self.sync.apply(payload)
            except Exception:
                log.exception("could not apply a state update")
        shell = self.kernel.shell
        if count and shell is not None:
            self.kernel.execution_count = count
            shell.execution_count = count + 1

    def close_soon(self) -> None:
        task = asyncio.get_event_loop().create_task(self.log.close())
        self._tasks.add(task)
