"""Replica coordinators over the in-memory log: elections, state updates, a replica that was
cut off, and a new replica that catches up from a snapshot, with no sockets or processes."""

from __future__ import annotations

import asyncio
from typing import Any

from nbcluster.consensus import InMemoryLogGroup
from nbcluster.kernel._records import Done, Proposal, encode_record
from nbcluster.kernel._replication import ReplicaCoordinator
from nbcluster.kernel._sync import StateSynchronizer, encode_payload
from nbcluster.store import InMemoryStore

STORE = InMemoryStore()


class Replica:
    def __init__(self, replica_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = replica_id
        self.ns: dict[str, Any] = {"__name__": "__main__"}
        self.sync = StateSynchronizer(self.ns, set(), STORE)
        self.counts: list[int] = []
        self.coordinator = ReplicaCoordinator(replica_id, 3, loop, self._on_state)

    def _on_state(self, payload: Any, count: int) -> None:
        if payload is not None:
            self.sync.apply(payload)
        self.counts.append(count)


async def _run_cell(leader: Replica, log: Any, term: int, code: str) -> str | None:
    await log.propose(encode_record(Proposal("lead", term, 1, leader.id, f"m{term}")), 5)
    winner = await leader.coordinator.decision(term, 1, 5)
    if winner != leader.id:
        return winner
    exec(code, leader.ns)
    payload = leader.sync.capture(term, code, f"<cell {term}>").payload
    done = Done(term, leader.id, "ok", term, encode_payload(payload) if payload else None)
    await log.propose(encode_record(done), 5)
    return winner


async def test_followers_apply_each_cell_and_a_late_replica_catches_up_from_a_snapshot() -> None:
    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    group, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"], compaction_entries=4
    )
    cells = [
        "x = 1",
        "def bump():\n    global x\n    x += 1\n    return x",
        "bump(); items = [x, x * 10]",
        "del items\nlabel = 'ok'",
    ]
    for term, code in enumerate(cells, start=1):
        assert await _run_cell(replicas[0], logs[0], term, code) == "r1"
    for follower in replicas[1:]:
        assert await follower.coordinator.caught_up(len(cells), 5)
        assert follower.ns["x"] == 2 and follower.ns["label"] == "ok"
        assert "items" not in follower.ns
        assert follower.ns["bump"]() == 3  # the function works on the follower's globals
        assert follower.ns["x"] == 3
    assert group.snapshot_index > 0  # the log was compacted: the newcomer needs the snapshot

    newcomer = Replica("r4", loop)
    await logs[0].add_member("r4", 5)
    group.start("r4", newcomer.coordinator)
    assert await newcomer.coordinator.caught_up(len(cells), 5)
    assert newcomer.ns["x"] == 2 and newcomer.ns["label"] == "ok" and "items" not in newcomer.ns
    assert newcomer.ns["bump"]() == 3
    assert newcomer.coordinator.done_term == len(cells)


async def test_a_cut_off_replica_never_executes_a_term_decided_without_it() -> None:
    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    group, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"]
    )
    assert await _run_cell(replicas[0], logs[0], 1, "x = 10") == "r1"
    group.partition("r3")
    assert await _run_cell(replicas[0], logs[0], 2, "x = 20") == "r1"
    group.heal("r3")
    # r3 (say, the gateway's stale target) tries to lead term 2 after healing: r1 already won
    assert await _run_cell(replicas[2], logs[2], 2, "x = 999") == "r1"
    assert replicas[2].ns["x"] == 20
    assert await replicas[1].coordinator.caught_up(2, 5) and replicas[1].ns["x"] == 20


async def test_malformed_records_are_rejected_and_the_replica_keeps_applying() -> None:
    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    _, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"]
    )
    await logs[1].propose(b"\xc1 not msgpack", 5)
    await logs[1].propose(encode_record(Done(1, "r2", "ok", 1, b"garbage")), 5)
    assert await _run_cell(replicas[0], logs[0], 1, "y = 5") == "r1"
    assert await replicas[2].coordinator.caught_up(1, 5)
    assert replicas[2].ns["y"] == 5
    assert replicas[2].coordinator.rejected == 1  # the garbage record; the stray done is ignored


async def test_a_cell_that_changes_nothing_still_moves_the_followers_count() -> None:
    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    _, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"]
    )
    assert await _run_cell(replicas[0], logs[0], 1, "x = 1") == "r1"
    assert await _run_cell(replicas[0], logs[0], 2, "x + 1") == "r1"
    assert await replicas[1].coordinator.caught_up(2, 5)
    assert replicas[1].counts == [1, 2]


async def test_the_names_of_a_cell_whose_state_never_arrives_are_known_to_the_others() -> None:
    from nbcluster.kernel._records import decode_record
    from nbcluster.kernel._touched import bound_names

    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    _, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"]
    )
    code = "import json\ntotal = 0\nfor i in range(3):\n    total += i\ndef f():\n    global g\n"
    binds = tuple(bound_names(code))
    assert binds == ("f", "g", "i", "json", "total")
    lead = Proposal("lead", 1, 1, "r1", "m1", binds)
    assert decode_record(encode_record(lead)) == lead
    await logs[0].propose(encode_record(lead), 5)
    # r1 "ran" the cell and died before its done record: r2 never gets the state
    assert await replicas[1].coordinator.decision(1, 1, 5) == "r1"
    assert not await replicas[1].coordinator.caught_up(1, 0.05)
    assert replicas[1].coordinator.bound_by(1) == binds
    assert replicas[1].coordinator.bound_by(2) == ()


async def test_decisions_kept_stay_bounded_over_a_long_kernel_life() -> None:
    """Every cell scans the decisions (``_lead_ahead``): only recent terms are kept."""
    loop = asyncio.get_running_loop()
    replicas = [Replica(r, loop) for r in ("r1", "r2", "r3")]
    _group, logs = InMemoryLogGroup.create(
        [r.coordinator for r in replicas], addresses=["r1", "r2", "r3"]
    )
    for term in range(1, 401):
        assert await _run_cell(replicas[0], logs[0], term, f"x = {term}") == "r1"
    coordinator = replicas[0].coordinator
    assert await coordinator.caught_up(400, 5)
    assert 64 <= len(coordinator.decisions) <= 130
    assert coordinator.decisions[(400, 1)] == "r1" and (1, 1) not in coordinator.decisions
