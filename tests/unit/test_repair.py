"""Restoring a kernel's replica count: the pure decisions (backoff, membership reconciliation,
what counts as degraded), the placement that avoids a failed attempt's host, and what the
gateway tells the user about a cell cut off with its replica."""

from __future__ import annotations

import orjson
import pytest

from nbcluster.gateway._driver import Placement, SchedulerDriver
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.gateway._repair import RepairStatus, RetryPolicy, is_degraded, plan_membership
from nbcluster.protocol import new_message
from nbcluster.scheduling import HostAdded, HostRemoved, ReplicaStopped, Resources

from .fakes import FakeClient, make_kernel

# -- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    policy = RetryPolicy(first_delay=1.0, factor=2.0, max_delay=30.0)
    assert [policy.delay(n) for n in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_stays_at_the_cap_after_very_many_failures() -> None:
    policy = RetryPolicy(first_delay=0.5, factor=3.0, max_delay=20.0)
    assert policy.delay(10_000) == 20.0


@pytest.mark.parametrize(
    "options",
    [
        {"first_delay": 0.0},
        {"first_delay": 5.0, "max_delay": 1.0},
        {"factor": 0.5},
        {"attempt_timeout": 0.0},
    ],
)
def test_a_policy_that_could_spin_or_never_retry_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


# -- membership reconciliation ------------------------------------------------------------------

A, B, DEAD, NEW, EARLIER = "h:1", "h:2", "h:3", "h:4", "h:5"


def test_the_dead_member_is_removed_before_the_new_one_is_added() -> None:
    plan = plan_membership([A, B, DEAD], running=[A, B], new=NEW)
    assert (plan.remove, plan.add, plan.missing) == ((DEAD,), (NEW,), ())


def test_a_failed_attempt_whose_addition_committed_is_removed_again() -> None:
    # The first attempt removed DEAD and added EARLIER, whose replica then never joined.
    plan = plan_membership([A, B, EARLIER], running=[A, B], new=NEW)
    assert (plan.remove, plan.add) == ((EARLIER,), (NEW,))


def test_a_failed_attempt_whose_changes_did_not_commit_is_done_in_full() -> None:
    plan = plan_membership([A, B, DEAD], running=[A, B], new=NEW)
    assert (plan.remove, plan.add) == ((DEAD,), (NEW,))


def test_nothing_to_change_when_the_new_address_is_already_the_third_member() -> None:
    plan = plan_membership([A, B, NEW], running=[A, B], new=NEW)
    assert plan.empty and plan.missing == ()


def test_running_replicas_the_member_does_not_know_are_reported_not_removed() -> None:
    plan = plan_membership([A, DEAD], running=[A, B], new=NEW)
    assert (plan.remove, plan.add, plan.missing) == ((DEAD,), (NEW,), (B,))


# -- degraded -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "wanted", "serving", "reclaimed", "degraded"),
    [
        ("idle", 3, 3, False, False),
        ("idle", 3, 2, False, True),
        ("busy", 3, 1, False, True),
        ("starting", 3, 0, False, False),  # being started: not yet all there
        ("restarting", 3, 0, False, False),  # restarted or restored: every replica anew
        ("dead", 3, 0, False, False),  # reported as dead
        ("idle", 3, 0, True, False),  # released while idle, by design
        ("idle", 1, 0, False, False),  # a single-replica kernel has no degraded mode
    ],
)
def test_degraded_means_serving_fewer_replicas_than_configured(
    state: str, wanted: int, serving: int, reclaimed: bool, degraded: bool
) -> None:
    assert is_degraded(state, wanted, serving, reclaimed) is degraded


def test_a_kernel_is_degraded_while_its_replacement_catches_up() -> None:
    kernel, _ = make_kernel("r1", "r2", "r3")
    kernel.record.replica_count = 3
    assert not kernel.degraded
    kernel.record.replicas[2].state = "dead"
    assert kernel.degraded and kernel.serving_replicas == 2
    kernel.record.replicas.append(
        kernel.record.replicas[0].model_copy(update={"state": "starting"})
    )
    assert kernel.degraded  # still catching up: it cannot run cells yet
    kernel.record.replicas[-1].state = "running"
    assert not kernel.degraded


def test_the_repair_summary_is_plain_json() -> None:
    status = RepairStatus(failed_attempts=2, last_error="refused")
    assert orjson.loads(orjson.dumps(status.summary())) == {
        "attempting": False,
        "failed_attempts": 2,
        "last_error": "refused",
        "retry_at": None,
    }


# -- placement of a replacement ---------------------------------------------------------------


def _scheduling(hosts: list[str]) -> tuple[SchedulerDriver, list[tuple[str, str]]]:
    """A scheduler with ``hosts`` and one 3-replica kernel ``k1`` placed on three of them."""
    gpus = SchedulerDriver({}, GatewayMetrics(), max_subscription_ratio=7.0, replicas_per_kernel=3)
    for name in hosts:
        gpus.handle(HostAdded(name, Resources(0, 8000, 16384, 0.0), ()))
    place = gpus.place_kernel("k1", Resources(0, 1000, 1024, 0.0), 3, "notebookos")
    assert isinstance(place, Placement), place
    return gpus, list(place.replicas)


def _place_replica(gpus: SchedulerDriver, holding: str | None = None) -> tuple[str, str] | None:
    """``(replica_id, host)`` of one more replica of ``k1``, or None when it was refused."""
    placed = gpus.place_replica("k1", holding)
    if not isinstance(placed, Placement):
        return None
    [(replica_id, host)] = placed.replicas
    return replica_id, host


def _replicas(gpus: SchedulerDriver) -> list[str]:
    """The replica ids the scheduler has placed for ``k1``."""
    view = gpus.kernel_view("k1")
    assert view is not None
    return [rid for rid, _ in view.replicas]


def test_a_retry_goes_to_another_host_than_the_failed_attempt_when_one_has_room() -> None:
    gpus, placed = _scheduling(["h1", "h2", "h3", "h4", "h5"])
    lost_id, _ = placed[0]
    gpus.handle(ReplicaStopped("k1", lost_id))
    first = _place_replica(gpus)
    assert first is not None
    failed_id, failed_host = first
    second = _place_replica(gpus, holding=failed_id)
    assert second is not None
    assert second[1] != failed_host
    assert second[1] not in {host for rid, host in placed[1:]}
    # The failed attempt's placement was released: only the new one counts.
    assert set(_replicas(gpus)) == {*(rid for rid, _ in placed[1:]), second[0]}


def test_with_a_single_free_host_the_failed_one_is_tried_again() -> None:
    gpus, placed = _scheduling(["h1", "h2", "h3"])
    lost_id, lost_host = placed[0]
    gpus.handle(ReplicaStopped("k1", lost_id))
    first = _place_replica(gpus)
    assert first is not None and first[1] == lost_host
    again = _place_replica(gpus, holding=first[0])
    assert again is not None and again[1] == lost_host and again[0] != first[0]
    assert set(_replicas(gpus)) == {*(rid for rid, _ in placed[1:]), again[0]}


def test_without_any_host_nothing_is_placed_and_the_held_placement_is_released() -> None:
    gpus, placed = _scheduling(["h1", "h2", "h3"])
    lost_id, lost_host = placed[0]
    gpus.handle(ReplicaStopped("k1", lost_id))
    first = _place_replica(gpus)
    assert first is not None
    gpus.handle(HostRemoved(lost_host))  # the only free host goes away
    assert _place_replica(gpus, holding=first[0]) is None
    assert set(_replicas(gpus)) == {rid for rid, _ in placed[1:]}


# -- a cell cut off with its replica --------------------------------------------------------------


def test_a_cut_off_cell_is_answered_replica_lost_with_its_count_and_the_right_reason() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    # An older failover's dead replica comes first in the record: not the reason now.
    kernel.record.replicas[0].state, kernel.record.replicas[0].reason = "dead", "old loss"
    client = FakeClient()
    kernel.attach(client)
    first = new_message("shell", "execute_request", {"code": "x = 1"}, session="c")
    kernel.handle_client_message(client, first)
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r1"],
        new_message("shell", "execute_reply", {"status": "ok", "execution_count": 1}, parent=first),
    )
    cut = new_message("shell", "execute_request", {"code": "sleep()"}, session="c")
    kernel.handle_client_message(client, cut)
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "replica r1 on host h0 exited with code -9")
    yielded = {
        "status": "error",
        "ename": "ExecutionYieldError",
        "evalue": "r1 did",
        "execution_count": 2,
    }
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r2"], new_message("shell", "execute_reply", yielded, parent=cut)
    )
    [reply] = [m.content_dict for m in client.sent if m.msg_type == "execute_reply"][1:]
    assert reply["ename"] == "ReplicaLost"
    assert "exited with code -9" in reply["evalue"] and "old loss" not in reply["evalue"]
    assert reply["execution_count"] == 2
    # The next cell does not wait for the cut-off cell's state: none is coming.
    following = new_message("shell", "execute_request", {"code": "x"}, session="c")
    kernel.handle_client_message(client, following)
    meta = orjson.loads(links["r2"].sent[-1].metadata)["nbcluster"]
    assert meta == {"term": 3, "attempt": 1, "after_term": 1}


def test_a_cell_that_simply_ran_elsewhere_still_moves_the_awaited_term() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    cell = new_message("shell", "execute_request", {"code": "x = 1"}, session="c")
    kernel.handle_client_message(client, cell)
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "lost before it started the cell")
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r2"],
        new_message("shell", "execute_reply", {"status": "ok", "execution_count": 1}, parent=cell),
    )
    following = new_message("shell", "execute_request", {"code": "x"}, session="c")
    kernel.handle_client_message(client, following)
    meta = orjson.loads(links["r2"].sent[-1].metadata)["nbcluster"]
    assert meta == {"term": 2, "attempt": 1, "after_term": 1}


# -- nbcluster status -----------------------------------------------------------------------------


def test_status_marks_a_degraded_kernel_and_says_what_is_done_about_it() -> None:
    from nbcluster.cli._status import _repair_text, _replica_count

    degraded = {
        "replicas_wanted": 3,
        "replicas_running": 2,
        "degraded": True,
        "repair": {
            "attempting": False,
            "failed_attempts": 2,
            "last_error": "replica r9 on h4: refused",
            "retry_at": "2026-01-01T00:00:04Z",
        },
    }
    assert "2/3 degraded" in _replica_count(degraded)
    assert _repair_text(degraded) == (
        "runs on 2 of 3 replicas; 2 replacement attempt(s) failed (last: replica r9 on h4: "
        "refused); next attempt at 2026-01-01T00:00:04Z"
    )
    healthy = {"replicas_wanted": 3, "replicas_running": 3, "degraded": False, "repair": None}
    assert _replica_count(healthy) == "3/3"
    assert _replica_count({}) == "-"  # a gateway that does not report it


def test_a_lost_cell_whose_state_arrived_says_its_variables_were_kept() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    cell = new_message("shell", "execute_request", {"code": "x = 1"}, session="c")
    kernel.handle_client_message(client, cell)
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "replica r1 exited with code -9")
    # r1 had finished and its state committed; only its reply died with it.
    yielded = {"status": "error", "ename": "ExecutionYieldError", "completed": True}
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r2"], new_message("shell", "execute_reply", yielded, parent=cell)
    )
    [reply] = [m.content_dict for m in client.sent if m.msg_type == "execute_reply"]
    assert reply["ename"] == "ReplicaLost"
    assert "variables were kept" in reply["evalue"] and "effects are lost" not in reply["evalue"]
