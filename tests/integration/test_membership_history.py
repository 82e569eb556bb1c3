"""A Raft group whose members were replaced many times keeps exact membership views.

pysyncobj 0.3.17 applies a membership entry to a node's view when the entry is appended and
undoes it when the entry is truncated. A new member starts with the current membership, then
receives the whole log, every earlier replacement's ``add``/``rem`` included, and the leader
re-sends ranges it already has while it catches up (so they are truncated and re-appended).
Left to pysyncobj, undoing an old ``add`` of a member that is still there drops that member:
new members ended up without the leader and the other survivor and with long-dead members,
and never caught up. ``PySyncObjLog`` derives the view from the log instead (docs/consensus.md,
"Membership is a function of the log").

The test replaces members of a real three-node group over and over, the way the gateway
replaces lost replicas: stop one, remove it, add a new node on a new port, start it with the
live members as its peers, wait until it has caught up. The survivors keep committing while
the new node catches up (that is what makes the leader re-send ranges), and the records are
large enough that catching up takes several append batches. After each replacement every live
node's view must be exactly the live set and the group must commit through every member.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from nbcluster.consensus import LogError, PySyncObjLog
from nbcluster.consensus._pysyncobj import _TruncationNoiseFilter

from ..cluster import async_wait_for, free_port
from .test_consensus_raft import Nodes, converged, raft_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPLACEMENTS = 14
#: Records appended before each replacement, and their size: the log a new member replays
#: grows with every replacement and takes several append batches (64 KiB each).
RECORDS_BETWEEN = 6
RECORD_SIZE = 12_000
#: What the gateway gives a membership change and a new replica's catch-up proposal.
CHANGE_TIMEOUT = 20.0
CATCH_UP_TIMEOUT = 20.0
VIEW_TIMEOUT = 10.0


def _views(nodes: Sequence[PySyncObjLog]) -> dict[str, list[str]]:
    return {n.address: n.status()["members"] for n in nodes}


async def _views_are(nodes: Sequence[PySyncObjLog], expected: list[str], what: str) -> None:
    """Wait until every node's membership is exactly ``expected``; fail naming every view."""
    try:
        await async_wait_for(
            lambda: all(view == expected for view in _views(nodes).values()),
            VIEW_TIMEOUT,
            what,
            interval=0.01,
        )
    except AssertionError:
        raise AssertionError(f"{what}: expected {expected}, views {_views(nodes)}") from None


async def _keep_proposing(
    nodes: Sequence[PySyncObjLog], round_: int, stop: asyncio.Event, failures: list[str]
) -> None:
    """The survivors keep committing small records while the new member catches up."""
    k = 0
    while not stop.is_set():
        try:
            await nodes[k % len(nodes)].propose(b"meanwhile-%d-%d" % (round_, k), CHANGE_TIMEOUT)
        except LogError as exc:
            failures.append(f"replacement {round_}: a survivor could not commit: {exc}")
            return
        k += 1
        await asyncio.sleep(0.005)


async def test_replacing_members_many_times_keeps_every_view_exact(tmp_path: Path) -> None:
    async with raft_cluster(tmp_path) as (nodes, _addresses):
        start = time.perf_counter()
        truncations = _TruncationNoiseFilter.suppressed
        live = await _replace_many_times(nodes, list(nodes.logs))
        restores = sum(n.status()["snapshots_restored"] for n in live)
        print(
            f"\n{REPLACEMENTS} replacements in {time.perf_counter() - start:.1f} s; "
            f"{_TruncationNoiseFilter.suppressed - truncations} re-sent ranges truncated, "
            f"{restores} snapshots installed by the live members"
        )


async def _replace_many_times(nodes: Nodes, live: list[PySyncObjLog]) -> list[PySyncObjLog]:
    payload = b"x" * RECORD_SIZE
    for round_ in range(1, REPLACEMENTS + 1):
        for k in range(RECORDS_BETWEEN):
            await live[k % len(live)].propose(b"%d-%d-" % (round_, k) + payload, CHANGE_TIMEOUT)
        # Lose a member: the leader every other round (an election follows), else a follower.
        # (Who leads is read for the set-up only.)
        leaders = {n.status()["leader"] for n in live} - {None}
        if round_ % 2 and len(leaders) == 1:
            victim = next((n for n in live if n.address in leaders), live[0])
        else:
            victim = next((n for n in live if n.address not in leaders), live[0])
        await victim.close()
        survivors = [n for n in live if n is not victim]
        helper = survivors[round_ % len(survivors)]
        await helper.remove_member(victim.address, CHANGE_TIMEOUT)
        new_address = f"127.0.0.1:{free_port()}"
        await helper.add_member(new_address, CHANGE_TIMEOUT)
        members = sorted([*(n.address for n in survivors), new_address])

        stop = asyncio.Event()
        failures: list[str] = []
        busy = asyncio.create_task(_keep_proposing(survivors, round_, stop, failures))
        joiner = nodes.start(new_address, members)
        try:
            # What a new replica does before it may serve (ReplicaGroup.catch_up).
            await joiner.wait_ready(CATCH_UP_TIMEOUT)
            await joiner.propose(b"caught-up-%d" % round_, CATCH_UP_TIMEOUT)
        except LogError as exc:
            raise AssertionError(
                f"replacement {round_}: the new member did not catch up ({exc}); expected "
                f"{members}, views {_views([*survivors, joiner])}"
            ) from exc
        finally:
            stop.set()
            await busy
        assert failures == []
        live = [*survivors, joiner]
        await _views_are(live, members, f"replacement {round_}: every view to be the live set")
        # The group still commits, through every member, and every view stays exact.
        ours = set()
        for node in live:
            ours.add(b"after-%d-%s" % (round_, node.address.encode()))
            await node.propose(b"after-%d-%s" % (round_, node.address.encode()), CHANGE_TIMEOUT)
        await converged(nodes, members, ours)
        assert _views(live) == dict.fromkeys(members, members), f"replacement {round_}"
    return live
