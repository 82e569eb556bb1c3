"""InMemoryLog: the deterministic one-process replicated log that unit tests build on."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from nbcluster.consensus import InMemoryLog, InMemoryLogGroup, LogError, ReplicatedLog

SHORT = 0.05


class Recorder:
    """A LogStateMachine that keeps every (index, record) and counts snapshots/restores."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, bytes]] = []
        self.restores = 0
        self.snapshots = 0

    @property
    def records(self) -> list[bytes]:
        return [data for _, data in self.applied]

    def apply(self, index: int, data: bytes) -> None:
        self.applied.append((index, data))

    def snapshot(self) -> bytes:
        self.snapshots += 1
        return json.dumps([[i, d.decode()] for i, d in self.applied]).encode()

    def restore(self, data: bytes) -> None:
        self.restores += 1
        self.applied = [(i, d.encode()) for i, d in json.loads(data)]


def group_of(
    n: int = 3, compaction_entries: int = 1000
) -> tuple[InMemoryLogGroup, list[InMemoryLog], list[Recorder]]:
    states = [Recorder() for _ in range(n)]
    group, logs = InMemoryLogGroup.create(states, compaction_entries=compaction_entries)
    return group, logs, states


def assert_gap_free(state: Recorder) -> None:
    assert [i for i, _ in state.applied] == list(range(1, len(state.applied) + 1))


def test_it_implements_the_replicated_log_protocol() -> None:
    _, logs, _ = group_of(1)
    log: ReplicatedLog = logs[0]
    assert log.status()["members"] == ["m1"]


async def test_every_member_applies_every_record_in_the_same_order_before_propose_returns() -> None:
    group, logs, states = group_of(3)
    await logs[1].propose(b"first", SHORT)
    assert all(s.records == [b"first"] for s in states)
    proposals = [(log, f"{log.address}-{k}".encode()) for k in range(20) for log in logs]
    await asyncio.gather(*(log.propose(data, SHORT) for log, data in proposals))
    assert states[0].records == states[1].records == states[2].records
    assert states[0].records == [b"first", *(data for _, data in proposals)]
    assert group.records == states[0].records
    for state in states:
        assert_gap_free(state)
    assert all(log.status()["records_applied"] == 61 for log in logs)


async def test_the_same_program_gives_the_same_log() -> None:
    async def run() -> list[bytes]:
        group, logs, states = group_of(3, compaction_entries=4)
        for k in range(10):
            await logs[k % 2].propose(f"r{k}".encode(), SHORT)
            if k == 3:
                group.partition(logs[2])
            if k == 7:
                group.heal(logs[2])
        return states[2].records

    assert await run() == await run() == [f"r{k}".encode() for k in range(10)]


async def test_a_partitioned_member_cannot_commit_and_receives_nothing_until_healed() -> None:
    group, logs, states = group_of(3)
    await logs[0].propose(b"a", SHORT)
    group.partition(logs[2])
    assert logs[2].status()["leader"] is None
    with pytest.raises(LogError, match="partitioned"):
        await logs[2].propose(b"lost", SHORT)
    await logs[0].propose(b"b", SHORT)
    await logs[1].propose(b"c", SHORT)
    assert states[2].records == [b"a"]
    group.heal(logs[2])
    assert states[2].records == [b"a", b"b", b"c"]
    assert states[2].restores == 0  # only the tail: nothing was compacted
    assert b"lost" not in group.records
    await logs[2].propose(b"d", SHORT)
    assert states[0].records == states[2].records == [b"a", b"b", b"c", b"d"]
    assert_gap_free(states[2])


async def test_a_waiting_proposal_commits_when_the_partition_heals_in_time() -> None:
    group, logs, states = group_of(3)
    group.partition(logs[0])
    waiting = asyncio.create_task(logs[0].propose(b"patient", 5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    group.heal(logs[0])
    await asyncio.wait_for(waiting, 1.0)
    assert all(s.records == [b"patient"] for s in states)


async def test_without_a_quorum_nobody_commits() -> None:
    group, logs, states = group_of(3)
    group.partition(logs[1])
    group.partition(logs[2])
    with pytest.raises(LogError, match="no quorum"):
        await logs[0].propose(b"alone", SHORT)
    assert logs[0].status()["has_quorum"] is False
    group.heal(logs[1])
    await logs[0].propose(b"together", SHORT)
    assert states[0].records == states[1].records == [b"together"]
    assert states[2].records == []


async def test_a_member_added_late_gets_a_snapshot_then_the_tail() -> None:
    group, logs, states = group_of(3, compaction_entries=5)
    for k in range(12):
        await logs[k % 3].propose(f"r{k}".encode(), SHORT)
    assert group.snapshot_index == 10  # compacted at entries 5 and 10
    await logs[0].add_member("m4", SHORT)
    assert group.members == ["m1", "m2", "m3", "m4"]
    assert all(log.status()["members"] == group.members for log in logs)
    newcomer = Recorder()
    log4 = group.start("m4", newcomer)
    # restore(snapshot of records 1..10), then records 11 and 12 applied with their indexes
    assert newcomer.restores == 1
    assert newcomer.applied == states[0].applied
    assert log4.status()["snapshots_restored"] == 1
    await log4.propose(b"from-m4", SHORT)
    assert all(s.records[-1] == b"from-m4" for s in [*states, newcomer])
    assert_gap_free(newcomer)


async def test_a_node_started_before_it_is_added_waits_then_catches_up() -> None:
    group, logs, states = group_of(3)
    await logs[0].propose(b"a", SHORT)
    state = Recorder()
    early = group.start("m4", state)
    assert state.records == []
    with pytest.raises(LogError, match="not a member"):
        await early.propose(b"too-early", SHORT)
    await logs[1].add_member("m4", SHORT)
    assert state.records == [b"a"]
    await early.propose(b"b", SHORT)
    assert states[0].records == [b"a", b"b"]


async def test_removed_members_get_nothing_more_and_cannot_commit() -> None:
    group, logs, states = group_of(3)
    await logs[0].propose(b"a", SHORT)
    await logs[0].remove_member("m3", SHORT)
    assert group.members == ["m1", "m2"]
    await logs[1].propose(b"b", SHORT)
    assert states[2].records == [b"a"]
    with pytest.raises(LogError, match="not a member"):
        await logs[2].propose(b"c", SHORT)
    # two members left: both are needed
    group.partition(logs[1])
    with pytest.raises(LogError, match="no quorum"):
        await logs[0].propose(b"d", SHORT)


async def test_membership_changes_are_checked() -> None:
    _, logs, _ = group_of(3)
    with pytest.raises(LogError, match="already a member"):
        await logs[0].add_member("m2", SHORT)
    with pytest.raises(LogError, match="itself"):
        await logs[0].remove_member("m1", SHORT)
    with pytest.raises(LogError, match="not a member"):
        await logs[0].remove_member("m9", SHORT)
    with pytest.raises(TypeError):
        await logs[0].propose("text", SHORT)  # type: ignore[arg-type]


async def test_a_closed_member_fails_fast_and_a_restarted_one_catches_up() -> None:
    group, logs, states = group_of(3, compaction_entries=3)
    for k in range(7):
        await logs[0].propose(f"r{k}".encode(), SHORT)
    await logs[2].close()
    with pytest.raises(LogError, match="closed"):
        await logs[2].propose(b"x", 10.0)  # no waiting for a timeout
    await logs[0].propose(b"while-down", SHORT)
    fresh = Recorder()
    group.start("m3", fresh)
    assert fresh.restores == 1
    assert fresh.applied == states[0].applied
    with pytest.raises(ValueError, match="already running"):
        group.start("m3", Recorder())


async def test_closing_members_can_cost_the_quorum_and_a_waiting_proposal_sees_its_own_close() -> (
    None
):
    group, logs, _ = group_of(3)
    await logs[1].close()
    await logs[2].close()
    waiting = asyncio.create_task(logs[0].propose(b"x", 5.0))
    await asyncio.sleep(0)
    await logs[0].close()
    with pytest.raises(LogError, match="closed"):
        await asyncio.wait_for(waiting, 1.0)
    assert group.records == []


async def test_a_member_cut_off_past_a_compaction_is_restored_from_the_snapshot() -> None:
    group, logs, states = group_of(3, compaction_entries=4)
    await logs[0].propose(b"a", SHORT)
    group.partition("m2")
    for k in range(6):
        await logs[0].propose(f"r{k}".encode(), SHORT)
    group.compact()
    group.heal("m2")
    assert states[1].restores == 1
    assert states[1].applied == states[0].applied


async def test_wait_ready_waits_for_a_quorum() -> None:
    group, logs, _ = group_of(3)
    await logs[0].wait_ready(SHORT)
    group.partition(logs[0])
    with pytest.raises(LogError, match="partitioned"):
        await logs[0].wait_ready(SHORT)
    loop = asyncio.get_running_loop()
    loop.call_soon(group.heal, logs[0])
    await logs[0].wait_ready(1.0)


async def test_a_failing_apply_is_logged_and_does_not_wedge_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Fussy(Recorder):
        def apply(self, index: int, data: bytes) -> None:
            if data == b"bad":
                raise ValueError("cannot apply")
            super().apply(index, data)

    states = [Fussy(), Fussy()]
    _, logs = InMemoryLogGroup.create(states, addresses=["a", "b"])
    with caplog.at_level(logging.ERROR):
        await logs[0].propose(b"bad", SHORT)
        await logs[0].propose(b"good", SHORT)
    assert states[0].applied == states[1].applied == [(2, b"good")]
    assert "failed to apply record 1" in caplog.text


def test_status_has_the_same_keys_as_the_raft_log() -> None:
    _, logs, _ = group_of(2)
    assert set(logs[0].status()) == {
        "backend",
        "self",
        "leader",
        "term",
        "commit_index",
        "last_applied",
        "records_applied",
        "snapshots_restored",
        "members",
        "has_quorum",
        "ready",
        "closed",
        "refused_connections",
    }
    assert logs[0].status()["leader"] == "m1"
