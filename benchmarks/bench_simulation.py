"""A workload simulation on the real scheduler core: GPU-hours of per-cell binding (notebookos)
against life-long reservations on the same synthetic notebook workload, and how long cells
wait for their GPUs.

    .venv/bin/python benchmarks/bench_simulation.py [--notebooks 120] [--hosts 8] [--hours 8]

The workload (seeded, so runs are comparable): notebooks open at random times over the
period and stay open for hours; a user thinks for minutes between cells (exponential, mean
``--think-min``) and a GPU cell runs for a lognormal duration (median ``--cell-min``);
kernels ask for 1 or 2 GPUs. The same events drive ``nbcluster.scheduling.Scheduler`` under
each policy, with simulated time; a migration is charged ``--migration-s`` of delay.
GPU-hours are the integral of committed GPUs. Under ``reservation`` a kernel that finds no free
GPUs is refused (counted), as the real gateway does.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from dataclasses import dataclass, field

from nbcluster.scheduling import (
    BindGpus,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    KernelRequested,
    KernelStopped,
    Migrate,
    PlaceReplicas,
    RejectKernel,
    Resources,
    Scheduler,
    SchedulerConfig,
)


@dataclass(order=True)
class _Event:
    time: float
    order: int
    kind: str = field(compare=False)
    kernel: str = field(compare=False)
    term: int = field(compare=False, default=0)


@dataclass
class _Notebook:
    kernel: str
    gpus: int
    opens: float
    closes: float


def workload(args: argparse.Namespace) -> list[_Notebook]:
    rng = random.Random(args.seed)
    period = args.hours * 3600
    notebooks = []
    for n in range(args.notebooks):
        opens = rng.uniform(0, period * 0.8)
        stays = rng.uniform(1.0, 4.0) * 3600
        notebooks.append(
            _Notebook(
                f"nb{n:04d}", 1 if rng.random() < 0.7 else 2, opens, min(opens + stays, period)
            )
        )
    return notebooks


def simulate(policy: str, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed + 1)  # the same cells under both policies
    scheduler = Scheduler(SchedulerConfig(max_subscription_ratio=args.subscription))
    for h in range(args.hosts):
        scheduler.handle(HostAdded(f"h{h}", Resources(8, 64_000, 512_000, 8 * 40.0)))
    events: list[_Event] = []
    counter = 0

    def push(time: float, kind: str, kernel: str, term: int = 0) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, _Event(time, counter, kind, kernel, term))

    notebooks = {nb.kernel: nb for nb in workload(args)}
    for nb in notebooks.values():
        push(nb.opens, "open", nb.kernel)
        push(nb.closes, "close", nb.kernel)
    open_kernels: set[str] = set()
    requested_at: dict[tuple[str, int], float] = {}
    durations: dict[tuple[str, int], float] = {}
    delays: list[float] = []
    terms: dict[str, int] = {}
    refused = migrations = 0
    gpu_seconds = 0.0
    now = 0.0

    def committed() -> int:
        return scheduler.summary().committed_gpus

    def carry_out(actions: list[object], time: float) -> None:
        nonlocal migrations
        for action in actions:
            if isinstance(action, Migrate):
                migrations += 1
            elif isinstance(action, BindGpus) and action.term is not None:
                key = (action.kernel_id, action.term)
                if key not in requested_at:
                    continue
                moved = any(
                    isinstance(a, Migrate) and a.new_replica_id == action.replica_id
                    for a in actions
                )
                start = time + (args.migration_s if moved else 0.0)
                delays.append(start - requested_at.pop(key))
                push(start + durations.pop(key), "finish", action.kernel_id, action.term)

    def next_cell(kernel: str, time: float) -> None:
        think = rng.expovariate(1 / (args.think_min * 60))
        duration = rng.lognormvariate(math.log(args.cell_min * 60), 0.8)
        term = terms.get(kernel, 0) + 1
        terms[kernel] = term
        durations[(kernel, term)] = duration
        push(time + think, "cell", kernel, term)

    current = 0
    while events:
        event = heapq.heappop(events)
        gpu_seconds += current * (event.time - now)
        now = event.time
        nb = notebooks[event.kernel]
        if event.kind == "open":
            request = Resources(gpus=nb.gpus, millicpus=1000, memory_mb=4096)
            actions = scheduler.handle(KernelRequested(nb.kernel, request, policy=policy))
            if any(isinstance(a, RejectKernel) for a in actions):
                refused += 1
                continue
            assert any(isinstance(a, PlaceReplicas) for a in actions)
            open_kernels.add(nb.kernel)
            next_cell(nb.kernel, now)
        elif event.kind == "cell" and nb.kernel in open_kernels:
            requested_at[(nb.kernel, event.term)] = now
            carry_out(scheduler.handle(ExecutionRequested(nb.kernel, event.term)), now)
        elif event.kind == "finish" and nb.kernel in open_kernels:
            carry_out(scheduler.handle(ExecutionFinished(nb.kernel, event.term)), now)
            next_cell(nb.kernel, now)
        elif event.kind == "close" and nb.kernel in open_kernels:
            open_kernels.discard(nb.kernel)
            carry_out(scheduler.handle(KernelStopped(nb.kernel)), now)
        current = committed()
    delays.sort()
    p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))] if delays else 0.0
    return {
        "gpu_hours": gpu_seconds / 3600,
        "cells": float(len(delays)),
        "p50_delay": delays[len(delays) // 2] if delays else 0.0,
        "p95_delay": p95,
        "refused": float(refused),
        "migrations": float(migrations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", type=int, default=120)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--think-min", type=float, default=6.0)
    parser.add_argument("--cell-min", type=float, default=1.5)
    parser.add_argument("--migration-s", type=float, default=2.0)
    parser.add_argument("--subscription", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    results = {policy: simulate(policy, args) for policy in ("reservation", "notebookos")}
    print(
        f"{args.notebooks} notebooks over {args.hours:g} h on {args.hosts} hosts x 8 GPUs "
        f"(think {args.think_min:g} min, cells {args.cell_min:g} min median, seed {args.seed})"
    )
    for policy, r in results.items():
        print(
            f"  {policy:11s} GPU-hours {r['gpu_hours']:8.1f}   kernels refused {r['refused']:4.0f}"
            f"   cells {r['cells']:6.0f}   start delay p50 {r['p50_delay']:6.2f} s"
            f"  p95 {r['p95_delay']:6.2f} s   migrations {r['migrations']:4.0f}"
        )
    reservation, notebookos = results["reservation"], results["notebookos"]
    print(
        f"  notebookos / reservation GPU-hours: {notebookos['gpu_hours'] / reservation['gpu_hours']:.2f}"
        f" (target <= 0.50; reservation refused {reservation['refused']:.0f} kernels that "
        f"notebookos served), notebookos p95 cell start delay {notebookos['p95_delay']:.2f} s "
        "(target <= 1 s)"
    )


if __name__ == "__main__":
    main()
