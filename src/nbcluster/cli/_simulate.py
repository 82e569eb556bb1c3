"""``nbcluster simulate``: replay a trace through the gateway's scheduler, once per policy,
and compare the policies side by side (``docs/simulation.md``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..scheduling import POLICIES
from ..simulation import (
    TRACE_FORMATS,
    Cluster,
    LoadedTrace,
    PolicyOutcome,
    SessionGrouping,
    SimulationSettings,
    TraceError,
    plots_available,
    read_trace,
    simulate,
    simulation_report,
    summary_table,
    verify_recording,
    write_json,
    write_plots,
    write_summary_csv,
    write_timeline_csv,
)

__all__ = ["parse_duration", "simulate_command"]

#: The policies compared when ``--policy`` is not given.
DEFAULT_POLICIES = ("notebookos", "reservation", "batch")

_F = TypeVar("_F", bound=Callable[..., Any])

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``/``30min``, ``2h`` or ``1d``; ``ValueError``
    otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a duration (90, 90s, 30m, 2h, 1d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """The callback of the duration options."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


#: The type of the options that take a number above 0.
_POSITIVE = click.FloatRange(0, min_open=True)


def _number_option(
    flag: str, default: float, kind: click.ParamType[Any, Any], help: str
) -> Callable[[_F], _F]:
    """An option that takes a number and has a default, shown in ``--help``."""
    return click.option(flag, default=default, show_default=True, type=kind, help=help)


def _duration_option(
    flag: str, help: str, *, default: str | None = None, metavar: str | None = None
) -> Callable[[_F], _F]:
    """An option that takes a duration (``90``, ``30m``, ``2h`` ...: :func:`parse_duration`),
    its value in seconds; a default, when it has one, is shown in ``--help``."""
    if default is None:
        return click.option(flag, callback=_duration, metavar=metavar, help=help)
    return click.option(
        flag, default=default, show_default=True, callback=_duration, metavar=metavar, help=help
    )


def _policies(values: tuple[str, ...]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()] or list(DEFAULT_POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise click.BadParameter(
            f"unknown policy {', '.join(map(repr, unknown))}; known: {', '.join(sorted(POLICIES))}",
            param_hint="--policy",
        )
    return list(dict.fromkeys(names))


def _cluster(
    loaded: LoadedTrace,
    hosts: int | None,
    gpus_per_host: int,
    min_hosts: int | None,
    max_hosts: int | None,
    scaling_buffer: int,
) -> Cluster:
    if hosts is not None and (min_hosts is not None or max_hosts is not None):
        raise click.UsageError("give either --hosts (a fixed cluster) or --min-hosts/--max-hosts")
    if hosts is not None:
        return Cluster.fixed(hosts, gpus_per_host)
    if min_hosts is None and max_hosts is None and loaded.workload.hosts:
        return Cluster(loaded.workload.hosts)  # the recorded cluster
    # NotebookOS's evaluation cluster (12 to 32 hosts) where an end is not given.
    high = max_hosts if max_hosts is not None else max(32, min_hosts or 0)
    low = min_hosts if min_hosts is not None else min(12, high)
    if high < low:
        raise click.BadParameter(
            f"--max-hosts {high} is below --min-hosts {low}", param_hint="--max-hosts"
        )
    return Cluster.autoscaled(low, high, gpus_per_host, scaling_buffer)


@click.command("simulate")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="NAME[,NAME...]",
    help=f"Policies to compare, side by side (repeat or comma-separate; known: "
    f"{', '.join(sorted(POLICIES))}). Default: {','.join(DEFAULT_POLICIES)}.",
)
@click.option(
    "--format",
    "trace_format",
    default="auto",
    show_default=True,
    type=click.Choice(TRACE_FORMATS),
    help="Trace format: Tiresias CSV, NotebookOS template JSON, or an nbcluster recording "
    "(auto: .csv, .json, .jsonl, else by content).",
)
@click.option("--hosts", type=click.IntRange(1), help="A fixed cluster of N hosts.")
@_number_option("--gpus-per-host", 8, click.IntRange(1), "GPUs per host.")
@click.option(
    "--min-hosts",
    type=click.IntRange(0),
    help="Auto-scaling floor (default, without --hosts: 12, NotebookOS's evaluation cluster, "
    "or --max-hosts if lower).",
)
@click.option(
    "--max-hosts", type=click.IntRange(1), help="Auto-scaling ceiling (default 32, or --min-hosts)."
)
@_number_option(
    "--scaling-buffer",
    3,
    click.IntRange(0),
    "Spare hosts the auto-scaler keeps above --min-hosts (NotebookOS: 3).",
)
@_number_option("--subscription-ratio", 7.0, _POSITIVE, "The gateway's --max-subscription-ratio.")
@_duration_option(
    "--reclaim-idle-after",
    "Replicated kernels idle this long release their replicas (default: never).",
    metavar="DURATION",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write summary.json, summary.csv, timeline.csv and PNG plots here.",
)
@_number_option(
    "--tick-seconds",
    60.0,
    _POSITIVE,
    "Seconds per time unit of a CSV (minutes in the Sensei trace) or template tick.",
)
@_duration_option(
    "--idle-gap",
    "CSV grouping: a training joins a session idle for at most this long.",
    default="30m",
)
@_duration_option(
    "--session-lead",
    "CSV grouping: a session opens this long before its first training.",
    default="0",
)
@_duration_option(
    "--session-tail",
    "CSV grouping: a session closes this long after its last training (default: --idle-gap).",
)
@_duration_option(
    "--max-session",
    "CSV grouping: no training joins a session older than this (default: no limit).",
)
@click.option(
    "--group-by-model",
    is_flag=True,
    help="CSV grouping: a session runs trainings of one model name only.",
)
@_number_option(
    "--migration-seconds", 2.0, click.FloatRange(0), "What a migration adds to a cell's start."
)
@_number_option(
    "--host-start-seconds",
    15.0,
    click.FloatRange(0),
    "How long a host the auto-scaler starts takes to register.",
)
@_number_option("--scaling-interval", 15.0, _POSITIVE, "Seconds between auto-scaling rounds.")
@click.option(
    "--verify",
    is_flag=True,
    help="Recordings: first replay the recorded events exactly and check that the scheduler "
    "makes the recorded decisions.",
)
@click.option("--no-plots", is_flag=True, help="With --out, write no PNG plots.")
def simulate_command(
    trace: Path,
    policies: tuple[str, ...],
    trace_format: str,
    hosts: int | None,
    gpus_per_host: int,
    min_hosts: int | None,
    max_hosts: int | None,
    scaling_buffer: int,
    subscription_ratio: float,
    reclaim_idle_after: float | None,
    out_dir: Path | None,
    tick_seconds: float,
    idle_gap: float,
    session_lead: float,
    session_tail: float | None,
    max_session: float | None,
    group_by_model: bool,
    migration_seconds: float,
    host_start_seconds: float,
    scaling_interval: float,
    verify: bool,
    no_plots: bool,
) -> None:
    """Replay TRACE through nbcluster's scheduler in simulated time, once per policy, and
    compare GPU-hours, cell start delays, migrations and hosts side by side."""
    names = _policies(policies)
    if reclaim_idle_after == 0:
        raise click.BadParameter("must be above 0", param_hint="--reclaim-idle-after")
    grouping = SessionGrouping(
        idle_gap=idle_gap,
        lead=session_lead,
        tail=session_tail,
        max_length=max_session,
        by_model=group_by_model,
    )
    err = Console(stderr=True)
    out = Console(soft_wrap=True)
    try:
        with err.status(f"reading {trace}"):
            loaded = read_trace(trace, trace_format, grouping=grouping, tick_seconds=tick_seconds)
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None
    workload = loaded.workload
    if not workload.sessions:
        raise click.ClickException(f"{trace}: no sessions to replay")
    if verify:
        if loaded.recording is None:
            raise click.UsageError("--verify needs an nbcluster recording as TRACE")
        check = verify_recording(loaded.recording)
        if not check.identical:
            for mismatch in check.mismatches:
                err.print(f"[red]differs[/red] {mismatch.describe()}", markup=True, highlight=False)
            raise click.ClickException(
                f"{check.mismatched_steps} of {check.steps} recorded events get other "
                "decisions from this scheduler"
            )
        out.print(
            f"Verified: {check.steps} recorded events ({check.runs} gateway run(s)) get the "
            "recorded decisions from this scheduler."
        )
    cluster = _cluster(loaded, hosts, gpus_per_host, min_hosts, max_hosts, scaling_buffer)
    settings = SimulationSettings(
        cluster=cluster,
        max_subscription_ratio=subscription_ratio,
        reclaim_idle_after=reclaim_idle_after,
        migration_seconds=migration_seconds,
        host_start_seconds=host_start_seconds,
        scaling_interval=scaling_interval,
    )
    described = [
        f"cluster: {cluster.describe()}",
        f"max subscription ratio {subscription_ratio:g}; idle reclamation "
        + (f"after {reclaim_idle_after:g} s" if reclaim_idle_after else "off"),
        f"a migration adds {migration_seconds:g} s, a started host registers after "
        f"{host_start_seconds:g} s, scaling rounds every {scaling_interval:g} s",
    ]
    out.print(
        f"[bold]{trace.name}[/bold]: {len(workload.sessions):,} sessions, {workload.cells:,} "
        f"cells over {workload.span / 3600:,.1f} h, {workload.gpu_hours_needed:,.1f} GPU-hours "
        "of cells",
        highlight=False,
    )
    for line in (*workload.notes, *described):
        out.print(f"  {line}", highlight=False, markup=False)
    outcomes: list[PolicyOutcome] = []
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.fields[at]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        for name in names:
            task = progress.add_task(name, total=1.0, at="")

            def report(done: float, total: float, task: TaskID = task) -> None:
                progress.update(
                    task, completed=done / total, at=f"{done / 3600:,.0f} of {total / 3600:,.0f} h"
                )

            outcomes.append(simulate(workload, name, settings, progress=report))
    out.print(summary_table(outcomes))
    if out_dir is not None:
        _write(out_dir, loaded, described, outcomes, plots=not no_plots, console=out)


def _write(
    out_dir: Path,
    loaded: LoadedTrace,
    described: list[str],
    outcomes: list[PolicyOutcome],
    *,
    plots: bool,
    console: Console,
) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "summary.json", out_dir / "summary.csv", out_dir / "timeline.csv"]
        write_json(written[0], simulation_report(loaded.workload, described, outcomes))
        write_summary_csv(written[1], outcomes)
        write_timeline_csv(written[2], outcomes)
        if plots and plots_available():
            written += write_plots(out_dir, outcomes)
        elif plots:
            console.print(
                "No plots: matplotlib is not installed (pip install 'nbcluster[plots]').",
                highlight=False,
            )
    except OSError as exc:
        raise click.ClickException(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    console.print("Wrote " + ", ".join(str(p) for p in written), highlight=False)
