"""Tiresias-style job CSVs (``job_id,num_gpu,submit_time,iterations,model_name,duration,
interval``), such as the Adobe Sensei summary: trainings without sessions, grouped into
sessions by ``_grouping``.

Times and durations are in trace units (``tick_seconds`` each: the Sensei trace counts
minutes). Rows may come in any order (the Sensei file is ordered by job id, not by time):
they are sorted by submission time, so order is not checked here.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ._errors import TraceError
from ._grouping import SessionGrouping, Training, group_trainings
from ._workload import Workload

__all__ = ["REQUIRED_COLUMNS", "read_tiresias_csv"]

#: Columns a trace must have; ``model_name`` is read when present, the others are ignored.
REQUIRED_COLUMNS = ("job_id", "num_gpu", "submit_time", "duration")


def read_tiresias_csv(
    path: Path, grouping: SessionGrouping | None = None, tick_seconds: float = 60.0
) -> Workload:
    """The workload of a Tiresias CSV; :class:`TraceError` with the line for a missing
    column, a malformed or negative number, a duplicate job id or a short row."""
    grouping = grouping or SessionGrouping()
    trainings: list[Training] = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise TraceError(path, None, "empty file: expected a header line")
            columns = [c.strip() for c in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise TraceError(
                    path,
                    1,
                    f"missing column(s) {', '.join(missing)} (a Tiresias trace has "
                    f"{','.join(REQUIRED_COLUMNS)} and optionally model_name)",
                )
            index = {
                name: columns.index(name)
                for name in (*REQUIRED_COLUMNS, "model_name")
                if name in columns
            }
            width = len(columns)
            for row in reader:
                line = reader.line_num
                if not row or all(not field.strip() for field in row):
                    continue
                if len(row) < width:
                    raise TraceError(path, line, f"{len(row)} field(s), the header names {width}")
                job_id = row[index["job_id"]].strip()
                if not job_id:
                    raise TraceError(path, line, "job_id is empty")
                if job_id in seen:
                    raise TraceError(
                        path, line, f"job_id {job_id} repeats the one of line {seen[job_id]}"
                    )
                seen[job_id] = line
                gpus = _whole(path, line, row[index["num_gpu"]], "num_gpu")
                submit = _number(path, line, row[index["submit_time"]], "submit_time")
                duration = _number(path, line, row[index["duration"]], "duration")
                model = row[index["model_name"]].strip() if "model_name" in index else ""
                trainings.append(
                    Training(job_id, submit * tick_seconds, duration * tick_seconds, gpus, model)
                )
    except OSError as exc:
        raise TraceError(path, None, f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(path, None, f"not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise TraceError(path, None, f"not a CSV file: {exc}") from None
    if not trainings:
        raise TraceError(path, None, "no trainings: the file has a header and no rows")
    return Workload(
        str(path),
        "tiresias-csv",
        group_trainings(trainings, grouping),
        notes=(
            f"{len(trainings)} trainings; times in units of {tick_seconds:g} s",
            grouping.describe(),
        ),
    )


def _whole(path: Path, line: int, raw: str, column: str) -> int:
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        raise TraceError(path, line, f"{column} must be a whole number, got {text!r}") from None
    if value < 0:
        raise TraceError(path, line, f"{column} must not be negative, got {value}")
    return value


def _number(path: Path, line: int, raw: str, column: str) -> float:
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        raise TraceError(path, line, f"{column} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TraceError(path, line, f"{column} must be finite, got {text!r}")
    if value < 0:
        what = "a negative duration" if column == "duration" else "negative"
        raise TraceError(path, line, f"{column} is {what}: {text}")
    return value
