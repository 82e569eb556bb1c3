"""The simulated-time engine on the real scheduler: a tiny trace whose GPU-hours and start
delays are computed by hand for each policy, auto-scaling and idle reclamation, and
invariants on random workloads (the engine's accounting agrees with the scheduler's after
every event: ``check=True``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbcluster.scheduling import Resources
from nbcluster.simulation import (
    Cell,
    Cluster,
    Session,
    SimulationSettings,
    Workload,
    read_template,
    simulate,
)

HOUR = 3600.0


def tiny_trace(tmp_path: Path) -> Workload:
    """Four 1-GPU notebooks on three 1-GPU hosts, in hours (one tick = 3600 s).

    A: open 0-10, cells at 1 (3 h) and 5 (1 h); B: open 0-10, a cell at 2 (2 h);
    C: open 0-4, a cell at 2 (1 h); D: open 0-10, a cell at 2 (1 h).
    """

    def session(name: str, stop: int, *cells: tuple[int, int]) -> dict[str, object]:
        return {
            "id": name,
            "start_tick": 0,
            "stop_tick": stop,
            "trainings": [
                {"start_tick": s, "duration_in_ticks": d, "gpus": 1, "cpus": 100, "vram": 1}
                for s, d in cells
            ],
        }

    sessions = [
        session("A", 10, (1, 3), (5, 1)),
        session("B", 10, (2, 2)),
        session("C", 4, (2, 1)),
        session("D", 10, (2, 1)),
    ]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"sessions": sessions}))
    return read_template(path, tick_seconds=HOUR)


THREE_HOSTS = SimulationSettings(Cluster.fixed(3, 1))


def test_notebookos_binds_per_cell_and_d_waits_for_the_first_free_gpu(tmp_path: Path) -> None:
    # t=2: A holds one GPU (to 4), B and C take the other two, D waits; C ends at 3 and D,
    # whose replicas are on every host, gets C's GPU at once: 1 h late.
    s = simulate(tiny_trace(tmp_path), "notebookos", THREE_HOSTS, check=True).summary
    assert s.gpu_hours_held == pytest.approx(3 + 1 + 2 + 1 + 1)
    assert s.gpu_hours_used == pytest.approx(8)
    assert (s.cells_run, s.sessions_refused, s.cells_refused, s.migrations) == (5, 0, 0, 0)
    assert (s.delay_p50_s, s.delay_p95_s, s.delay_p99_s, s.delay_max_s) == (0, HOUR, HOUR, HOUR)
    assert (s.cells_waited, s.wait_mean_s) == (1, HOUR)
    assert s.gpu_hours_provisioned == pytest.approx(3 * 10)
    assert s.simulated_hours == pytest.approx(10)


def test_reservation_holds_gpus_for_the_session_and_refuses_the_fourth(tmp_path: Path) -> None:
    # A, B and C each take a GPU at t=0 for their whole session; D finds none: refused.
    s = simulate(tiny_trace(tmp_path), "reservation", THREE_HOSTS, check=True).summary
    assert s.gpu_hours_held == pytest.approx(10 + 10 + 4)
    assert s.gpu_hours_used == pytest.approx(3 + 1 + 2 + 1)
    assert (s.sessions_refused, s.cells_refused, s.cells_run) == (1, 1, 4)
    assert (s.delay_max_s, s.cells_waited) == (0, 0)


def test_batch_waits_for_its_own_host(tmp_path: Path) -> None:
    # One replica each, least loaded first: A host-1, B host-2, C host-3, D host-1 again.
    # D waits for A's cell to end at 4 (2 h), though C's GPU was free at 3.
    s = simulate(tiny_trace(tmp_path), "batch", THREE_HOSTS, check=True).summary
    assert s.gpu_hours_held == pytest.approx(8)
    assert (s.delay_p50_s, s.delay_max_s, s.cells_waited) == (0, 2 * HOUR, 1)
    assert s.wait_hours == pytest.approx(2)


def test_notebookos_migrates_when_every_replica_host_is_busy() -> None:
    # Four 1-GPU hosts. k's replicas take host-1..3 (least loaded, then by name); a, b, c, d
    # follow (a: host-4,1,2; b: host-3,4,1; c: host-2,3,4; d: host-1,2,3). At 10 s their cells
    # bind host-4, host-3, host-2 and host-1; a's ends at 15 s. At 20 s k's three hosts are
    # busy and host-4 is free: a replica of k moves there and the cell starts 2 s later.
    first = Session("k", 0, 500, Resources(gpus=1), (Cell(20, 50, 1),))
    others = [
        Session(name, 1, 500, Resources(gpus=1), (Cell(10, 5 if name == "a" else 100, 1),))
        for name in "abcd"
    ]
    workload = Workload("t", "test", (first, *others))
    outcome = simulate(workload, "notebookos", SimulationSettings(Cluster.fixed(4, 1)), check=True)
    assert outcome.summary.migrations == 1
    assert list(outcome.delays) == [0.0, 0.0, 0.0, 0.0, 2.0]
    # batch has one replica per kernel, which cannot move: k's cell waits for host-1.
    batch = simulate(workload, "batch", SimulationSettings(Cluster.fixed(4, 1)), check=True)
    assert batch.summary.migrations == 0 and batch.delays[-1] > 2.0


def test_auto_scaling_adds_hosts_for_waiting_cells_and_removes_idle_ones() -> None:
    # 20 one-GPU notebooks at once on an auto-scaled cluster of 1-GPU hosts (3 to 30): the
    # scheduler's ScaleOut and the rounds start hosts (15 s to register); once the cells are
    # done the rounds stop the idle ones again.
    sessions = tuple(
        Session(f"n{i}", 0, 3600, Resources(gpus=1), (Cell(0, 600, 1),)) for i in range(20)
    )
    workload = Workload("t", "test", sessions)
    cluster = Cluster.autoscaled(3, 30, 1, buffer_hosts=0)
    s = simulate(workload, "notebookos", SimulationSettings(cluster), check=True).summary
    assert s.cells_run == 20 and s.sessions_refused == 0
    assert s.hosts_max > 3 and s.hosts_started >= s.hosts_max - 3
    assert s.hosts_stopped > 0 and s.hosts_min == 3
    assert s.delay_max_s >= 15  # the last cells waited for a host to register


def test_idle_kernels_are_reclaimed_and_restored() -> None:
    # A replicated kernel idle for longer than 60 s releases its replicas; its next cell
    # places it again and starts restore_seconds (2 s) later.
    session = Session("k", 0, 1000, Resources(gpus=1), (Cell(10, 10, 1), Cell(500, 10, 1)))
    workload = Workload("t", "test", (session,))
    reclaiming = SimulationSettings(Cluster.fixed(3, 1), reclaim_idle_after=60)
    outcome = simulate(workload, "notebookos", reclaiming, check=True)
    assert outcome.summary.reclaims == 2  # after each cell (the second: before closing)
    assert list(outcome.delays) == [0.0, 2.0]
    # Single-replica kernels are never reclaimed, as in the gateway.
    assert simulate(workload, "batch", reclaiming).summary.reclaims == 0


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduling policy 'fifo'"):
        simulate(Workload("t", "test", ()), "fifo")


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    sessions = []
    for n in range(draw(st.integers(1, 12))):
        opens = draw(st.integers(0, 500))
        gpus = draw(st.sampled_from([0, 1, 2, 4]))
        cells = []
        at = opens
        for _ in range(draw(st.integers(0, 5))):
            at += draw(st.integers(0, 120))
            cells.append(Cell(at, draw(st.integers(0, 300)), gpus))
        closes = at + draw(st.integers(0, 200))
        sessions.append(Session(f"s{n}", opens, closes, Resources(gpus=gpus), tuple(cells)))
    sessions.sort(key=lambda s: s.opens)
    return Workload("random", "test", tuple(sessions))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads(),
    policy=st.sampled_from(["notebookos", "reservation", "batch"]),
    scaled=st.booleans(),
    reclaim=st.sampled_from([None, 30.0]),
)
def test_every_cell_is_accounted_for_and_held_covers_used(
    workload: Workload, policy: str, scaled: bool, reclaim: float | None
) -> None:
    cluster = Cluster.autoscaled(3, 8, 4, buffer_hosts=0) if scaled else Cluster.fixed(3, 4)
    setup = SimulationSettings(cluster, reclaim_idle_after=reclaim, host_start_seconds=5)
    s = simulate(workload, policy, setup, check=True).summary
    assert s.cells_run + s.cells_refused + s.cells_unfinished == workload.cells
    assert s.cells_unfinished == 0  # every request fits a host: nothing waits forever
    assert s.gpu_hours_held >= s.gpu_hours_used - 1e-9
    assert s.gpu_hours_used <= workload.gpu_hours_needed + 1e-9
    assert s.delay_p50_s <= s.delay_p95_s <= s.delay_p99_s <= s.delay_max_s
    assert s.hosts_min <= s.hosts_mean + 1e-9 and s.hosts_mean <= s.hosts_max + 1e-9
