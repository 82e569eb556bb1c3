"""``nbcluster simulate`` as a user runs it (click's CliRunner): policies side by side on a
small trace with every output file, a recording checked with ``--verify``, and the errors a
bad trace or bad options give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nbcluster.cli import cli
from nbcluster.cli._simulate import parse_duration
from nbcluster.scheduling import Resources
from nbcluster.simulation import (
    Cell,
    Cluster,
    Session,
    SimulationReport,
    SimulationSettings,
    Workload,
    simulate,
)

TRACE = (
    "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n"
    "0,1,0,0,resnet50,60,0\n"  # one 1-GPU notebook: 1 h of training at 0, 1 h at 90 min
    "1,1,90,0,resnet50,60,0\n"
    "2,2,30,0,vgg16,30,0\n"  # a 2-GPU notebook: 30 min at 30 min
)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["simulate", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_policies_side_by_side_with_every_output(tmp_path: Path) -> None:
    trace = tmp_path / "jobs.csv"
    trace.write_text(TRACE)
    out = tmp_path / "out"
    code, output = run(
        str(trace),
        "--policy",
        "notebookos,reservation",
        "--hosts",
        "3",
        "--gpus-per-host",
        "2",
        "--idle-gap",
        "1h",
        "--out",
        str(out),
    )
    assert code == 0, output
    assert "notebookos" in output and "reservation" in output and "batch" not in output
    # Cells: 1 h + 1 h on 1 GPU, 30 min on 2 GPUs = 3 GPU-hours. Sessions (idle gap 1 h):
    # the 1-GPU one from 0 to 150 + 60 min, the 2-GPU one from 30 to 60 + 60 min.
    assert "3.0 GPU-hours of cells" in output
    report = SimulationReport.model_validate_json((out / "summary.json").read_text())
    by_name = {p.policy: p for p in report.policies}
    assert by_name["notebookos"].gpu_hours_held == pytest.approx(3.0)
    assert by_name["reservation"].gpu_hours_held == pytest.approx(1 * 3.5 + 2 * 1.5)
    assert report.notebookos_over_reservation == pytest.approx(3.0 / 6.5)
    assert "GPU-hours held, notebookos / reservation: 0.46" in output
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("policy,sessions,") and len(rows) == 3
    assert (out / "timeline.csv").read_text().startswith("policy,hour,gpus_committed_mean")
    assert all((out / name).stat().st_size > 0 for name in ("gpus.png", "delays.png", "hosts.png"))


def test_a_recording_is_verified_and_replayed_on_its_own_cluster(tmp_path: Path) -> None:
    recording = tmp_path / "last-week.jsonl"
    sessions = (
        Session("a", 0, 900, Resources(gpus=1), (Cell(10, 100, 1), Cell(400, 50, 1))),
        Session("b", 5, 900, Resources(gpus=2), (Cell(20, 300, 2),)),
    )
    simulate(
        Workload("w", "test", sessions),
        "notebookos",
        SimulationSettings(Cluster.fixed(3, 2)),
        record=recording,
    )
    code, output = run(str(recording), "--verify", "--policy", "notebookos")
    assert code == 0, output
    assert "get the recorded decisions from this scheduler" in output
    assert "cluster: 3 hosts, 6 GPUs (fixed)" in output  # the recorded hosts
    assert "Cells run" in output and "3 of 3" in output


def test_a_bad_trace_names_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(TRACE + "3,1,100,0,m,-5,0\n")
    code, output = run(str(trace))
    assert code == 1
    assert f"{trace}:5: duration is a negative duration: -5" in output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hosts", "2", "--max-hosts", "4"], "either --hosts"),
        (["--policy", "fifo"], "unknown policy 'fifo'"),
        (["--min-hosts", "5", "--max-hosts", "2"], "--max-hosts 2 is below --min-hosts 5"),
        (["--idle-gap", "soon"], "'soon' is not a duration"),
        (["--verify"], "--verify needs an nbcluster recording"),
    ],
)
def test_bad_options_say_what_is_wrong(tmp_path: Path, args: list[str], words: str) -> None:
    trace = tmp_path / "jobs.csv"
    trace.write_text(TRACE)
    result = CliRunner().invoke(cli, ["simulate", str(trace), *args])
    assert result.exit_code == 2
    assert words in result.output


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "30m", "1.5h", "2d", "5min")] == [
        90,
        90,
        1800,
        5400,
        172_800,
        300,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("-3m")
    assert json.dumps(parse_duration("0")) == "0.0"
