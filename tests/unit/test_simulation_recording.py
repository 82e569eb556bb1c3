"""Recording and replay: the gateway's ``SchedulerDriver`` records what its scheduler is told
and decides (``--record``); the simulator reads that format. One recorded sequence drives
both the simulator's scheduler and a driver fed the way the gateway feeds it, and they must
make the same decisions, step by step, in both directions."""

from __future__ import annotations

import json
import random
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbcluster.gateway._driver as driver_module
import nbcluster.scheduling as scheduling
from nbcluster.gateway import GatewayKernel
from nbcluster.gateway._driver import EvictionResult, SchedulerDriver
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.scheduling import (
    Evict,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    KernelRequested,
    Migrate,
    ReplicaStopped,
    Resources,
    ScaleIn,
    ScaleOut,
)
from nbcluster.simulation import (
    Cell,
    Cluster,
    RecordedStep,
    Session,
    SimulationSettings,
    Workload,
    read_recording,
    recording_workload,
    simulate,
    verify_recording,
)
from nbcluster.simulation._recording import (
    RecordedAction,
    decode_action,
    decode_event,
    encode_action,
    encode_event,
)


class Cells(dict[str, Any]):
    """Every kernel's ``CellRunner``: dispatches whatever it is given."""

    def get(self, key: str, default: Any = None) -> Any:
        return SimpleNamespace(
            dispatch=lambda term, replica, devices: True,
            show_waiting=lambda term, text: None,
            cell_started_after_wait=lambda term, text: None,
            cancel_waiting=lambda term, ename, reason: None,
        )


class Mover:
    async def move_replica(self, migrate: Migrate) -> bool:
        return True


class Hosts:
    def request_hosts(self, action: ScaleOut) -> None:
        pass

    def release_hosts(self, action: ScaleIn) -> None:
        pass


class Evictor:
    async def evict(
        self, kernel_id: str, replica_id: str, devices: tuple[int, ...], reason: str
    ) -> EvictionResult:
        return EvictionResult(True, freed_bytes=1 << 30)


def gateway_driver(record: Path, monkeypatch: pytest.MonkeyPatch) -> SchedulerDriver:
    """The gateway's driver, recording; replica ids numbered like the simulator's (the
    gateway's are random, which a replay takes from the recording)."""
    monkeypatch.setattr(driver_module, "new_replica_id", lambda kernel, n: f"{kernel}-r{n}")
    return SchedulerDriver(
        Cells(),
        GatewayMetrics(),
        max_subscription_ratio=7.0,
        replicas_per_kernel=3,
        mover=Mover(),
        hosts=Hosts(),
        evictor=Evictor(),
        record=record,
    )


def kernel(kernel_id: str) -> GatewayKernel:
    return cast(GatewayKernel, SimpleNamespace(id=kernel_id, record=SimpleNamespace(owner="")))


def feed(driver: SchedulerDriver, event: scheduling.Event) -> None:
    """Give ``event`` to the driver the way the gateway's code paths do."""
    match event:
        case KernelRequested():
            driver.place_kernel(event.kernel_id, event.request, event.replicas, event.policy)
        case ExecutionRequested():
            driver.execution_requested(
                kernel(event.kernel_id), event.term, event.preferred_replica, event.gpus
            )
        case ExecutionFinished():
            driver.execution_finished(kernel(event.kernel_id), event.term)
        case _:
            driver.handle(event)


def decisions(steps: list[RecordedStep]) -> list[tuple[object, ...]]:
    return [(s.event, s.new_replica_ids, s.actions) for s in steps]


def busy_workload(seed: int = 7) -> Workload:
    """Notebooks enough to make cells wait, migrate and the auto-scaler work."""
    rng = random.Random(seed)
    sessions = []
    for n in range(40):
        opens = rng.uniform(0, 3000)
        gpus = rng.choice([1, 1, 2, 4])
        at, cells = opens, []
        for _ in range(rng.randint(1, 6)):
            at += rng.expovariate(1 / 120)
            cells.append(Cell(at, rng.uniform(30, 900), gpus))
        sessions.append(Session(f"nb{n}", opens, at + 600, Resources(gpus=gpus), tuple(cells)))
    sessions.sort(key=lambda s: s.opens)
    return Workload("busy", "test", tuple(sessions))


async def test_the_gateway_driver_decides_as_the_simulator_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulated = tmp_path / "simulated.jsonl"
    cluster = Cluster.autoscaled(3, 12, 4, buffer_hosts=0)
    outcome = simulate(
        busy_workload(), "notebookos", SimulationSettings(cluster), record=simulated, check=True
    )
    # The sequence exercises what matters: waits, migrations, hosts added and removed.
    s = outcome.summary
    assert s.cells_waited > 0 and s.migrations > 0
    assert s.hosts_started > 0 and s.hosts_stopped > 0
    recorded = list(read_recording(simulated).steps())
    assert not any(isinstance(a, Evict) for step in recorded for a in step.actions)

    # The same events, fed to the gateway's driver as the gateway feeds them.
    replayed_path = tmp_path / "gateway.jsonl"
    driver = gateway_driver(replayed_path, monkeypatch)
    for step in recorded:
        feed(driver, step.event)
    await driver.close()
    replayed = list(read_recording(replayed_path).steps())
    assert len(replayed) == len(recorded) > 300
    assert decisions(replayed) == decisions(recorded)


async def test_a_gateway_recording_replays_to_the_same_decisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver_module, "new_replica_id", lambda kernel, n: f"{kernel}-x{n}")
    path = tmp_path / "gateway.jsonl"
    driver = SchedulerDriver(
        Cells(),
        GatewayMetrics(),
        max_subscription_ratio=7.0,
        replicas_per_kernel=3,
        mover=Mover(),
        hosts=Hosts(),
        evictor=Evictor(),
        record=path,
    )
    for name in ("h1", "h2", "h3", "h4"):
        driver.handle(HostAdded(name, Resources(2, 8000, 32_000, 80.0)))
    placed = driver.place_kernel("k", Resources(gpus=1), None, "notebookos")
    driver.place_kernel("r", Resources(gpus=2), None, "reservation")
    driver.execution_requested(kernel("k"), 1, None)
    driver.execution_finished(kernel("k"), 1)
    assert not isinstance(placed, driver_module.Refusal)
    first = placed.replicas[0][0]
    moved = await driver.migrate("k", first, None)
    assert isinstance(moved, driver_module.MigrationResult) and moved.ok
    driver.handle(ReplicaStopped("k", placed.replicas[1][0]))
    driver.place_replica("k")
    driver.execution_requested(kernel("k"), 2, None, gpus=0)
    driver.execution_finished(kernel("k"), 2)
    driver.handle(scheduling.KernelStopped("r"))
    await driver.close()

    recording = read_recording(path)
    check = verify_recording(recording)
    assert check.identical and check.steps == len(list(recording.steps())) == 14
    # Replica ids are the recorded ones (random in a real gateway), not the simulator's.
    assert any(r.endswith("-x4") for s in recording.steps() for r in s.new_replica_ids)

    # A tampered decision is caught, with its line.
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"BindGpus"' in line)
    step = json.loads(lines[index])
    bind = next(a for a in step["actions"] if a["action"] == "BindGpus")
    bind["fields"]["host"] = "h9"
    lines[index] = json.dumps(step)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n")
    check = verify_recording(read_recording(tampered))
    assert not check.identical and check.mismatches[0].line == index + 1
    assert "BindGpus" in check.mismatches[0].describe()


async def test_a_recording_becomes_a_workload_that_replays_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch never migrates, so a recorded cell's duration (bind to reply) is its own: the
    # workload read back from the recording replays to the same GPU-hours and delays.
    path = tmp_path / "batch.jsonl"
    workload = busy_workload(seed=3)
    setup = SimulationSettings(Cluster.fixed(6, 4))
    first = simulate(workload, "batch", setup, record=path)
    loaded = recording_workload(read_recording(path))
    assert [s.session_id for s in loaded.sessions] == [s.session_id for s in workload.sessions]
    assert [h.name for h in loaded.hosts] == [f"host-{n}" for n in range(1, 7)]
    again = simulate(loaded, "batch", SimulationSettings(Cluster(loaded.hosts)))
    assert again.summary.gpu_hours_held == pytest.approx(first.summary.gpu_hours_held)
    assert list(again.delays) == pytest.approx(list(first.delays))


def test_a_recording_file_is_owner_only_and_appends_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.jsonl"
    for _ in range(2):
        driver = gateway_driver(path, monkeypatch)
        driver.handle(HostAdded("h1", Resources(1, 1000, 1000, 8.0)))
        driver._recording.close()  # type: ignore[union-attr]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [len(run.steps) for run in read_recording(path).runs] == [1, 1]
    assert json.loads(path.read_text().splitlines()[0])["record"] == "header"


def sample_types() -> list[type]:
    return sorted(
        {*typing.get_args(scheduling.Event), *typing.get_args(scheduling.Action)},
        key=lambda t: t.__name__,
    )


def finite(value: object) -> bool:
    """No NaN or infinity in it (the scheduler is never given one: requests are checked)."""
    text = repr(value)
    return "nan" not in text and "inf" not in text


@pytest.mark.parametrize("kind", sample_types(), ids=lambda t: t.__name__)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_every_event_and_action_survives_the_codec(kind: type, data: st.DataObject) -> None:
    value = data.draw(st.from_type(kind).filter(finite))
    if kind in typing.get_args(scheduling.Event):
        name, fields = encode_event(value)
        text = json.dumps(fields)
        assert decode_event(name, json.loads(text)) == value
    else:
        recorded = encode_action(value)
        again = RecordedAction.model_validate_json(recorded.model_dump_json())
        assert decode_action(again) == value
