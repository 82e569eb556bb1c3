"""The ``done`` records of one replica commit in the order of their terms (kernel/_group.py):
a later term's committing first would make the earlier one stale, ignored by every replica."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from nbcluster.kernel._group import ReplicaGroup
from nbcluster.kernel._records import Done, decode_record

ME = "replica-a"


class FakeKernel:
    kernel_id = ""  # (no object store: the log only)
    replica_id = ME
    shell = None
    execution_count = 0

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def send_stream_warning(self, text: str) -> None:
        self.warnings.append(text)


class FakeLog:
    """Records the terms of the ``done`` records committed; the first proposed commits only
    once ``slow`` is set."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.slow = asyncio.Event()
        self._calls = 0

    async def propose(self, data: bytes, timeout: float) -> None:
        record = decode_record(data)
        assert isinstance(record, Done)
        self._calls += 1
        if self._calls == 1:
            await self.slow.wait()
        self.committed.append(record.term)


def group_with(raft: FakeLog) -> ReplicaGroup:
    group = ReplicaGroup(FakeKernel(), SimpleNamespace(), None, SimpleNamespace(refusals=None))  # type: ignore[arg-type]
    group.log = raft  # type: ignore[assignment]
    return group


async def test_done_records_commit_in_order_even_when_the_first_is_slow() -> None:
    raft = FakeLog()
    group = group_with(raft)
    group.sync = SimpleNamespace(  # a capture that changed nothing
        capture=lambda *args, **kwargs: None
    )
    for term in (1, 2, 3):
        group.finish(term, "ok", term, f"x = {term}")
    await asyncio.sleep(0.01)
    assert raft.committed == []  # term 1 is slow, and 2 and 3 wait for it
    raft.slow.set()
    await asyncio.wait_for(group._last_done, 5)  # type: ignore[arg-type]
    assert raft.committed == [1, 2, 3]
