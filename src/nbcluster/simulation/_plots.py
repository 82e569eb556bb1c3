"""PNG plots of a replay (matplotlib, the ``plots`` or ``datascience`` extra): GPUs committed
over time per policy, the CDF of cell start delays, and hosts over time.

``nbcluster simulate --out DIR`` calls :func:`write_plots` when matplotlib is importable
(:func:`plots_available`); it uses matplotlib's object API (no pyplot, no global state).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._results import PolicyOutcome, Timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plots_available", "write_plots"]


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(directory: Path, outcomes: Sequence[PolicyOutcome]) -> list[Path]:
    """``gpus.png``, ``delays.png`` and ``hosts.png`` in ``directory``; the paths written."""
    from matplotlib.figure import Figure  # here: matplotlib is an optional extra

    written: list[Path] = []

    gpus = _over_time(
        outcomes,
        lambda line: line.committed_mean,
        "GPUs committed (mean per interval)",
        "GPUs held over time",
    )
    written.append(_save(gpus, directory / "gpus.png"))

    delays = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = delays.add_subplot()
    for outcome in outcomes:
        values = outcome.delays
        if not values:
            continue
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axes.step(values, fractions, where="post", label=outcome.summary.policy)
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel("cell start delay (s)")
    axes.set_ylabel("fraction of cells")
    axes.set_ylim(0, 1.01)
    axes.set_title("Cell start delay (CDF)")
    axes.legend()
    written.append(_save(delays, directory / "delays.png"))

    hosts = _over_time(outcomes, lambda line: line.hosts, "hosts", "Hosts over time")
    written.append(_save(hosts, directory / "hosts.png"))
    return written


def _over_time(
    outcomes: Sequence[PolicyOutcome],
    series: Callable[[Timeline], Sequence[float]],
    ylabel: str,
    title: str,
) -> Figure:
    """One step line per policy of a quantity of its timeline (``series``), over hours."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for outcome in outcomes:
        line = outcome.timeline
        values = series(line)
        hours = [i * line.bucket_seconds / 3600 for i in range(len(values))]
        axes.step(hours, values, where="post", label=outcome.summary.policy)
    axes.set_xlabel("hours from the trace's start")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path
