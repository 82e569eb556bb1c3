"""``nbcluster simulate``'s trace readers: each format parsed (the shipped Sensei trace and
NotebookOS templates too), and bad traces refused with the line and the reason."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from nbcluster.scheduling import ExecutionRequested, HostAdded, KernelRequested, Resources
from nbcluster.simulation import (
    SessionGrouping,
    TraceError,
    detect_format,
    read_recording,
    read_template,
    read_tiresias_csv,
    read_trace,
)

DATA = Path("/work/shared/data")
HEADER = "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(path: Path, **kwargs: object) -> TraceError:
    with pytest.raises(TraceError) as caught:
        read_trace(path, **kwargs)  # type: ignore[arg-type]
    return caught.value


# -- Tiresias CSV -------------------------------------------------------------------------------


def test_a_tiresias_csv_becomes_sessions_in_seconds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "jobs.csv",
        HEADER + "0,1,10,0,resnet50,2,0\n1,4,0,0,vgg11,3,0\n2,1,12,0,resnet50,1,0\n",
    )
    workload = read_tiresias_csv(path, SessionGrouping(idle_gap=600))
    assert workload.trace_format == "tiresias-csv"
    # Rows come in any order: sorted by submission. Job 2 (1 GPU, 0 s after job 0 ended) joins
    # job 0's session; the 4-GPU job has its own.
    assert [
        (s.opens, s.request.gpus, [(c.submit, c.duration) for c in s.cells])
        for s in workload.sessions
    ] == [
        (0.0, 4, [(0.0, 180.0)]),
        (600.0, 1, [(600.0, 120.0), (720.0, 60.0)]),
    ]
    assert workload.sessions[1].closes == 780.0 + 600.0  # tail = idle gap
    assert workload.gpu_hours_needed == pytest.approx((4 * 180 + 120 + 60) / 3600)


def test_the_sensei_trace_is_read_whole() -> None:
    workload = read_trace(DATA / "sensei_june_60sec.csv").workload
    assert workload.cells == 30_909
    assert workload.gpu_hours_needed == pytest.approx(155_502.1667, abs=0.01)
    assert {s.request.gpus for s in workload.sessions} == {1, 4, 8}
    assert [s.opens for s in workload.sessions] == sorted(s.opens for s in workload.sessions)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("job_id,num_gpu,duration\n0,1,3\n", 1, "missing column(s) submit_time"),
        ("job_id,submit_time\n0,1\n", 1, "num_gpu, duration"),
        (HEADER + "0,1,10,0,m,2,0\n1,1,12,0,m,-3,0\n", 3, "duration is a negative duration: -3"),
        (HEADER + "0,1,-5,0,m,2,0\n", 2, "submit_time is negative: -5"),
        (HEADER + "0,one,10,0,m,2,0\n", 2, "num_gpu must be a whole number, got 'one'"),
        (HEADER + "0,1,10,0,m,2,0\n\n0,1,11,0,m,2,0\n", 4, "job_id 0 repeats the one of line 2"),
        (HEADER + "0,1,10\n", 2, "3 field(s), the header names 7"),
        (HEADER + "0,1,10,0,m,nan,0\n", 2, "duration must be finite"),
    ],
)
def test_a_bad_csv_names_its_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    error = refused(write(tmp_path, "bad.csv", text))
    assert error.line == line
    assert words in error.reason
    assert str(error).startswith(f"{tmp_path / 'bad.csv'}:{line}: ")


def test_an_empty_csv_or_one_without_rows_is_refused(tmp_path: Path) -> None:
    assert "empty file" in refused(write(tmp_path, "empty.csv", "")).reason
    assert "no trainings" in refused(write(tmp_path, "header.csv", HEADER)).reason


# -- NotebookOS templates -------------------------------------------------------------------------


def test_the_shipped_templates_are_read() -> None:
    one = read_template(DATA / "notebookos-template-1session_4trainings.json")
    [session] = one.sessions
    # The kernel asks for the most its trainings use; each training is a cell.
    assert session.request == Resources(gpus=4, millicpus=400, memory_mb=400, vram_gb=4.0)
    assert [(c.submit, c.duration, c.gpus) for c in session.cells] == [
        (120.0, 120.0, 1),
        (360.0, 120.0, 2),
        (600.0, 120.0, 3),
        (840.0, 120.0, 4),
    ]
    assert (session.opens, session.closes) == (60.0, 1080.0)
    four = read_trace(
        DATA / "notebookos-template-four-sessions-varied-training.json", tick_seconds=1
    )
    assert len(four.workload.sessions) == 4 and four.workload.cells == 15


def template(sessions: list[dict[str, object]]) -> str:
    return json.dumps({"workloadTitle": "t", "sessions": sessions}, indent=2)


def training(start: float, duration: float, gpus: int = 1) -> dict[str, object]:
    return {"start_tick": start, "duration_in_ticks": duration, "gpus": gpus, "cpus": 100}


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The line of the ``{`` that opens the object holding the nth ``needle``."""
    index = -1
    for _ in range(nth):
        index = text.index(needle, index + 1)
    opening = text.rindex("{", 0, index)
    return text.count("\n", 0, opening) + 1


@pytest.mark.parametrize(
    ("sessions", "needle", "nth", "words"),
    [
        (
            [{"id": "a", "start_tick": 1, "stop_tick": 9, "trainings": [training(2, -1)]}],
            '"duration_in_ticks": -1',
            1,
            "session 1, training 1: negative duration_in_ticks -1",
        ),
        (
            [
                {"id": "a", "start_tick": 1, "stop_tick": 9, "trainings": [training(2, 1)]},
                {
                    "id": "b",
                    "start_tick": 1,
                    "stop_tick": 9,
                    "trainings": [training(5, 1), training(3, 1)],
                },
            ],
            '"start_tick": 3',
            1,
            "session 2, training 2: trainings are not in time order: it starts at tick 3",
        ),
        (
            [{"id": "a", "start_tick": 5, "stop_tick": 2, "trainings": []}],
            '"id": "a"',
            1,
            "session 1 stops (tick 2) before it starts (tick 5)",
        ),
        (
            [
                {
                    "id": "a",
                    "start_tick": 1,
                    "stop_tick": 9,
                    "trainings": [{"start_tick": 2, "gpus": 1}],
                }
            ],
            '"gpus": 1',
            1,
            "session 1, training 1: field 'duration_in_ticks' Field required",
        ),
        (
            [{"id": "a", "start_tick": 3, "stop_tick": 9, "trainings": [training(2, 1)]}],
            '"start_tick": 2',
            1,
            "training 1 starts at tick 2, outside its session (ticks 3 to 9)",
        ),
        (
            [
                {"id": "a", "start_tick": 1, "stop_tick": 9, "trainings": []},
                {"id": "a", "start_tick": 1, "stop_tick": 9, "trainings": []},
            ],
            '"id": "a"',
            2,
            "session 2: id 'a' repeats the one of line 4",
        ),
    ],
)
def test_a_bad_template_names_its_line(
    tmp_path: Path, sessions: list[dict[str, object]], needle: str, nth: int, words: str
) -> None:
    text = template(sessions)
    error = refused(write(tmp_path, "bad.json", text))
    assert words in error.reason
    assert error.line == line_of(text, needle, nth)


def test_malformed_json_names_its_line(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "bad.json", '{\n  "sessions": [\n    {"id": ,}\n  ]\n}\n'))
    assert error.line == 3 and "not valid JSON" in error.reason
    error = refused(write(tmp_path, "list.json", "[1, 2]"))
    assert "JSON object with a 'sessions' list" in error.reason
    error = refused(write(tmp_path, "none.json", '{"sessions": []}'))
    assert "sessions" in error.reason


# -- recordings ------------------------------------------------------------------------------------

RECORDING_HEADER = json.dumps(
    {
        "record": "header",
        "started": "2026-01-01T00:00:00Z",
        "max_subscription_ratio": 7.0,
        "replicas_per_kernel": 3,
    }
)


def step(at: float, event: str, fields: Mapping[str, object], **more: object) -> str:
    return json.dumps({"record": "step", "at": at, "event": event, "fields": fields, **more})


HOST = {"name": "h1", "spec": {"gpus": 1, "millicpus": 1000, "memory_mb": 1000, "vram_gb": 8.0}}


def test_a_recording_is_decoded_into_scheduler_events(tmp_path: Path) -> None:
    kernel = {"kernel_id": "k", "request": {"gpus": 1}, "policy": "batch"}
    path = write(
        tmp_path,
        "run.jsonl",
        "\n".join(
            [
                RECORDING_HEADER,
                step(10.0, "HostAdded", HOST),
                step(
                    11.0,
                    "KernelRequested",
                    kernel,
                    new_replica_ids=["k-1"],
                    actions=[
                        {
                            "action": "PlaceReplicas",
                            "fields": {"kernel_id": "k", "replicas": [["k-1", "h1"]]},
                        }
                    ],
                ),
                step(12.5, "ExecutionRequested", {"kernel_id": "k", "term": 1}),
                RECORDING_HEADER,
            ]
        )
        + "\n",
    )
    recording = read_recording(path)
    assert [len(run.steps) for run in recording.runs] == [3, 0]
    steps = list(recording.steps())
    assert steps[0].event == HostAdded("h1", Resources(1, 1000, 1000, 8.0))
    assert steps[1].event == KernelRequested("k", Resources(gpus=1), policy="batch")
    assert steps[1].new_replica_ids == ("k-1",) and steps[1].line == 3
    assert steps[2].event == ExecutionRequested("k", 1)
    assert detect_format(path) == "recording"
    renamed = write(tmp_path, "run.log", path.read_text())
    assert detect_format(renamed) == "recording"


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        ([step(1, "HostAdded", HOST)], 1, "a step before any header"),
        (
            [RECORDING_HEADER, step(5, "HostAdded", HOST), step(4, "HostRemoved", {"name": "h1"})],
            3,
            "time goes backwards (unsorted times): 4.0 is before 5.0 on line 2",
        ),
        (
            [RECORDING_HEADER, step(1, "HostExploded", {})],
            2,
            "unknown scheduler event 'HostExploded'",
        ),
        (
            [RECORDING_HEADER, step(1, "HostAdded", {"name": "h1"})],
            2,
            "event HostAdded: field 'spec'",
        ),
        ([RECORDING_HEADER, "not json"], 2, "not a JSON object"),
        ([RECORDING_HEADER, step(-1, "HostRemoved", {"name": "h1"})], 2, "field 'step.at'"),
        (
            [
                RECORDING_HEADER,
                step(
                    1, "HostRemoved", {"name": "h1"}, actions=[{"action": "Explode", "fields": {}}]
                ),
            ],
            2,
            "unknown scheduler action 'Explode'",
        ),
    ],
)
def test_a_bad_recording_names_its_line(
    tmp_path: Path, lines: list[str], line: int, words: str
) -> None:
    error = refused(write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n"))
    assert error.line == line
    assert words in error.reason


def test_missing_files_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    assert "no such file" in refused(tmp_path / "nope.csv").reason
    error = refused(write(tmp_path, "trace.bin", "\x00\x01"))
    assert "--format" in error.reason
    assert "empty" in refused(write(tmp_path, "empty.jsonl", "")).reason
