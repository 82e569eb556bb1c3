"""Decision time of the pure scheduler core with 1,000 hosts and 10,000 kernels.

Adds 1,000 hosts with 8 GPUs each, then places 10,000 kernels (1-4 GPUs each, 3 replicas,
policy ``notebookos``), timing each ``KernelRequested``; then drives cells: each step either
finishes a running cell or requests one on a random idle kernel, keeping about 3,000 cells
running or waiting (about 7,500 of 8,000 GPUs wanted, so migrations and waits happen),
timing each ``ExecutionRequested`` and each ``ExecutionFinished`` (which retries waiting
cells). Prints p50/p99 of each against the target p99 ≤ 1 ms.

    python benchmarks/bench_scheduler.py [--hosts 1000] [--kernels 10000] [--cells 20000] [--running 3000]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

from _harness import percentile, summary
from nbcluster.scheduling import (
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    KernelRequested,
    PlaceReplicas,
    Resources,
    Scheduler,
)

TARGET_P99_S = 0.001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--kernels", type=int, default=10_000)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--running", type=int, default=3000, help="cells kept running")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    s = Scheduler()
    for i in range(args.hosts):
        s.handle(HostAdded(f"host-{i:04d}", Resources(8, 64_000, 128_000, 320.0)))

    placements: list[float] = []
    placed = 0
    for k in range(args.kernels):
        request = Resources(rng.randint(1, 4), 1000, 2048, 0.0)
        event = KernelRequested(f"kernel-{k:05d}", request)
        start = time.perf_counter()
        actions = s.handle(event)
        placements.append(time.perf_counter() - start)
        placed += any(isinstance(a, PlaceReplicas) for a in actions)

    kernels = list(s.kernels)
    running: dict[str, int] = {}
    last_executor: dict[str, str] = {}
    bindings: list[float] = []
    releases: list[float] = []
    outcomes: Counter[str] = Counter()
    term = 0
    while len(bindings) < args.cells:
        if len(running) >= args.running or (running and rng.random() < 0.3):
            kernel_id = rng.choice(list(running))
            event_done = ExecutionFinished(kernel_id, running.pop(kernel_id))
            start = time.perf_counter()
            actions = s.handle(event_done)
            releases.append(time.perf_counter() - start)
            for a in actions:
                outcomes[type(a).__name__] += 1
            continue
        kernel_id = rng.choice(kernels)
        if kernel_id in running:
            continue
        term += 1
        cell = ExecutionRequested(kernel_id, term, last_executor.get(kernel_id))
        start = time.perf_counter()
        actions = s.handle(cell)
        bindings.append(time.perf_counter() - start)
        running[kernel_id] = term  # a waiting cell is finished (dropped) like a running one
        for a in actions:
            outcomes[type(a).__name__] += 1
            replica_id = getattr(a, "replica_id", None)
            if replica_id is not None and getattr(a, "kernel_id", None) == kernel_id:
                last_executor[kernel_id] = replica_id

    overview = s.summary()
    print(
        f"{args.hosts} hosts x 8 GPUs, {args.kernels} kernels (1-4 GPUs, 3 replicas): "
        f"{placed} placed; max subscription ratio "
        f"{max(s.subscription_ratio(h) for h in s.hosts):.2f}"
    )
    print(f"placement (KernelRequested):   {summary(placements)}")
    print(f"binding (ExecutionRequested):  {summary(bindings)}")
    print(f"release (ExecutionFinished):   {summary(releases)}  incl. retrying waiting cells")
    print(
        "binding outcomes: "
        + ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
        + f"; at the end {overview.committed_gpus}/{overview.gpu_capacity} GPUs committed"
    )
    for name, values in (("placement", placements), ("binding", bindings), ("release", releases)):
        p99 = percentile(values, 99)
        verdict = "meets" if p99 <= TARGET_P99_S else "MISSES"
        print(f"{name}: p99 {p99 * 1000:.3f} ms {verdict} the target p99 ≤ 1 ms")


if __name__ == "__main__":
    main()
