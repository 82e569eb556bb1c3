"""What a trivial cell costs next to a big namespace: nbcluster (3 Raft replicas) vs a plain
local ipykernel driven by jupyter_client, both holding the same namespace, in the same run.

After each cell the executing replica captures the cell's state changes and ships them to the
other replicas (``nbcluster.kernel._sync``). This measures what that costs a user who runs
``1+1`` while holding:

* ``a``  an empty namespace
* ``b``  1,000 small globals (``globals()[f'v{i}'] = [i, str(i)]``)
* ``c1`` a 100 MiB NumPy array (float64)
* ``c2`` a 1 GiB NumPy array (``np.ones(2**27)``)
* ``d``  a 10-million-element Python list (``list(range(10_000_000))``)

Per case: a fresh plain kernel and a fresh 3-replica kernel (so the previous case's memory is
freed), two ``1+1`` cells on each, then the setup cell (timed, plain first, then nbcluster;
NumPy is imported in an untimed cell before it), then the benchmark waits for steady state:
the setup cell's state committed (``kernel_info``'s ``nbcluster.last_term``, as
tests/integration/test_replacement.py polls it) and the replica processes quiet (their CPU
time grows by less than ``QUIET_CPU_S`` in ``QUIET_WINDOW_S``: the followers have loaded it).
Then ``--warmup`` cells on each side, steady state again, and ``--repeat`` cells alternating
between the two kernels so that machine noise hits both alike. Each round trip is timed to
the ``execute_reply`` ("reply") and to the ``idle`` status that closes the cell ("idle").

Printed: per case and for reply and idle, p50 and p95 on each side, the p50 ratio nbcluster /
plain (target <= 1.5) and, on nbcluster, (c)/(a) (target <= 1.2). Then the setup cells: time
to reply and idle on both sides, and on nbcluster also to the state committed and to the
replicas quiet, with the bytes that reached the object store, which says where the time of
the cell that creates the 1 GiB array goes: reply - the code ran (and whatever delays the
reply); reply -> idle - the capture on the executor; idle -> committed - the Raft log;
committed -> quiet - the followers loading the state.

    python benchmarks/bench_sync.py [--repeat 30] [--warmup 3] [--cases a,b,c1,c2,d]
                                    [--quick] [--random] [--log FILE]

``--quick``: a smoke run with smaller sizes (10 MiB and 128 MiB arrays, a 1-million-element
list) and 8 cells. ``--random``: fill the arrays with random numbers instead of ones (data
that does not compress).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from _harness import percentile, start_cluster
from nbcluster.client import GatewayClient, KernelChannels

REPLICAS = 3
TARGET_RATIO = 1.5
TARGET_NAMESPACE_RATIO = 1.2
CELL = "1+1"
#: Generous: creating and shipping a 1 GiB array took 12.7 s when the issue was filed.
SETUP_TIMEOUT = 900.0
CELL_TIMEOUT = 300.0
COMMIT_TIMEOUT = 300.0
#: The replicas count as quiet (the followers have applied the state) when their CPU time,
#: all three together, grows by less than QUIET_CPU_S within QUIET_WINDOW_S.
QUIET_WINDOW_S = 0.5
QUIET_CPU_S = 0.1
QUIET_TIMEOUT = 300.0
MIB = 2**20


@dataclass
class Case:
    key: str
    label: str
    setup: str
    prelude: str = ""  # an untimed cell before the setup cell (imports)


def cases(quick: bool, random: bool) -> list[Case]:
    small_array = (10 if quick else 100) * MIB // 8
    big_array = 2**24 if quick else 2**27
    length = 1_000_000 if quick else 10_000_000

    def array(n: int) -> str:
        if random:
            return f"a = np.random.default_rng(0).random({n})"
        return f"a = np.ones({n})"

    def mib(n: int) -> str:
        return f"{n * 8 // MIB} MiB" if n * 8 < 2**30 else f"{n * 8 / 2**30:g} GiB"

    return [
        Case("a", "empty namespace", "pass"),
        Case("b", "1,000 small globals", "for i in range(1000): globals()[f'v{i}'] = [i, str(i)]"),
        Case("c1", f"{mib(small_array)} NumPy array", array(small_array), "import numpy as np"),
        Case("c2", f"{mib(big_array)} NumPy array", array(big_array), "import numpy as np"),
        Case("d", f"{length:,}-element list", f"l = list(range({length}))"),
    ]


@dataclass
class Timing:
    reply: float
    idle: float


@dataclass
class SetupTiming:
    plain: Timing
    nbc: Timing
    committed: float | None  # seconds from the request to the state committed on nbcluster
    quiet: float | None  # ... to the replicas quiet
    stored: int  # bytes the object store grew by


@dataclass
class CaseResult:
    case: Case
    plain: list[Timing] = field(default_factory=list)
    nbc: list[Timing] = field(default_factory=list)
    setup: SetupTiming | None = None
    memory: dict[str, int] = field(default_factory=dict)  # RSS after the cells
    stored_during: int = 0  # bytes the object store grew by during the timed cells
    notes: list[str] = field(default_factory=list)


# -- the plain kernel -------------------------------------------------------------------------


class PlainKernel:
    def __init__(self) -> None:
        self.km = AsyncKernelManager(kernel_name="python3")
        self.kc: AsyncKernelClient | None = None

    async def start(self) -> None:
        # Its stderr (only ipykernel's "running over TCP without encryption" warning) would
        # clutter the output.
        await self.km.start_kernel(stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int | None:
        provisioner = self.km.provisioner
        return getattr(provisioner, "pid", None) if provisioner else None

    async def cell(self, code: str, timeout: float = CELL_TIMEOUT) -> Timing:
        """Run ``code``; the seconds to its execute_reply and to its idle status. Shell and
        IOPub are read at the same time so that each message is timed when it arrives."""
        kc = self.kc
        assert kc is not None
        t0 = time.perf_counter()
        msg_id = kc.execute(code)

        async def reply() -> tuple[float, dict[str, Any]]:
            while True:
                msg = await kc.get_shell_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") == msg_id:
                    return time.perf_counter() - t0, msg["content"]

        async def idle() -> float:
            while True:
                msg = await kc.get_iopub_msg(timeout=timeout)
                if (
                    msg["parent_header"].get("msg_id") == msg_id
                    and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"
                ):
                    return time.perf_counter() - t0

        try:
            (replied, content), idled = await asyncio.gather(reply(), idle())
        except queue.Empty:
            raise TimeoutError(f"plain kernel: no answer to {code!r} in {timeout:.0f} s") from None
        assert content["status"] == "ok", content
        return Timing(replied, idled)

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            await self.km.shutdown_kernel(now=True)


# -- the nbcluster kernel ---------------------------------------------------------------------


class ClusterKernel:
    def __init__(self, gw: GatewayClient, state_dir: Path) -> None:
        self.gw = gw
        self.state_dir = state_dir
        self.kernel_id = ""
        self.channels: KernelChannels | None = None
        self.pids: list[int] = []
        self.replica_ids: list[str] = []
        #: execute_requests sent: the gateway gives each the next term (1, 2, ...)
        self.sent = 0
        self.warnings: list[str] = []

    async def start(self) -> None:
        self.kernel_id = (await self.gw.start_kernel())["id"]
        deadline = time.monotonic() + 120
        while True:
            replicas = await self.replicas()
            if len(replicas) == REPLICAS:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the kernel has {len(replicas)} running replicas, not 3")
            await asyncio.sleep(0.1)
        self.pids = [int(r["pid"]) for r in replicas]
        self.replica_ids = [str(r["replica_id"]) for r in replicas]
        self.channels = self.gw.channels(self.kernel_id)
        await self.channels.connect()

    async def replicas(self) -> list[dict[str, Any]]:
        for k in await self.gw.cluster_kernels():
            if k["id"] == self.kernel_id:
                return [r for r in k["replicas"] if r["state"] == "running"]
        raise KeyError(self.kernel_id)

    async def cell(self, code: str, timeout: float = CELL_TIMEOUT) -> Timing:
        channels = self.channels
        assert channels is not None
        t0 = time.perf_counter()
        msg_id = await channels.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        self.sent += 1
        replied = idled = None
        content: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while replied is None or idled is None:
            try:
                msg = await channels.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise TimeoutError(
                    f"nbcluster: no {'reply' if replied is None else 'idle'} to {code!r} "
                    f"in {timeout:.0f} s"
                ) from None
            kind = msg["msg_type"]
            if kind == "execute_reply":
                replied = time.perf_counter() - t0
                content = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idled = time.perf_counter() - t0
            elif kind == "stream" and msg["content"].get("name") == "stderr":
                text = msg["content"]["text"].strip()
                if text not in self.warnings:
                    self.warnings.append(text)
        assert content.get("status") == "ok", content
        return Timing(replied, idled)

    async def last_term(self) -> int:
        assert self.channels is not None
        reply = await self.channels.request("shell", "kernel_info_request", {}, 30)
        return int((reply["content"].get("nbcluster") or {}).get("last_term") or 0)

    async def committed(self, timeout: float = COMMIT_TIMEOUT) -> bool:
        """Wait until the state of every cell sent so far is committed (the executor's
        ``done_term`` reached the last term)."""
        deadline = time.monotonic() + timeout
        while await self.last_term() < self.sent:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                for p in (proc, *proc.children(recursive=True)):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = p.cpu_times()
                        total += times.user + times.system
        return total

    async def quiet(self, timeout: float = QUIET_TIMEOUT) -> float | None:
        """Wait until the replicas are quiet; the perf_counter time at which the first quiet
        window began (None if they never were within ``timeout``)."""
        samples: list[tuple[float, float]] = []
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            samples.append((now, self._cpu()))
            start = [s for s in samples if now - s[0] >= QUIET_WINDOW_S]
            if start and samples[-1][1] - start[-1][1] < QUIET_CPU_S:
                return start[-1][0]
            await asyncio.sleep(0.05)
        return None

    def store_bytes(self) -> int:
        root = self.state_dir / "store"
        total = 0
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def log_lines(self) -> dict[str, int]:
        """How many lines each replica's log has (to show what a case added)."""
        counts = {}
        for rid in self.replica_ids:
            for path in self.state_dir.glob(f"hosts/*/logs/{rid}.log"):
                with contextlib.suppress(OSError):
                    counts[str(path)] = len(path.read_text(errors="replace").splitlines())
        return counts

    def log_problems(self, since: dict[str, int]) -> list[str]:
        found = []
        for rid in self.replica_ids:
            for path in self.state_dir.glob(f"hosts/*/logs/{rid}.log"):
                with contextlib.suppress(OSError):
                    lines = path.read_text(errors="replace").splitlines()[since.get(str(path), 0) :]
                    found += [
                        f"{rid[:8]}: {line.strip()}"
                        for line in lines
                        if re.search(r"WARNING|ERROR|CRITICAL|Traceback", line)
                    ]
        return found

    async def stop(self) -> None:
        if self.channels is not None:
            await self.channels.close()
        if self.kernel_id:
            with contextlib.suppress(Exception):
                await self.gw.shutdown_kernel(self.kernel_id)
        # Free the memory before the next case: wait for the replica processes to exit.
        deadline = time.monotonic() + 30
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


# -- one case ---------------------------------------------------------------------------------


async def steady(nbc: ClusterKernel, result: CaseResult, what: str) -> tuple[float, float | None]:
    """Wait for the state committed and the replicas quiet; (committed at, quiet at) as
    perf_counter times."""
    if not await nbc.committed():
        result.notes.append(f"{what}: state not committed within {COMMIT_TIMEOUT:.0f} s")
    committed = time.perf_counter()
    quiet = await nbc.quiet()
    if quiet is None:
        result.notes.append(f"{what}: replicas not quiet within {QUIET_TIMEOUT:.0f} s")
    return committed, quiet


async def run_case(
    gw: GatewayClient, state_dir: Path, case: Case, repeat: int, warmup: int
) -> CaseResult:
    result = CaseResult(case)
    plain = PlainKernel()
    nbc = ClusterKernel(gw, state_dir)
    try:
        await plain.start()
        await nbc.start()
        logs = nbc.log_lines()
        for _ in range(2):
            await plain.cell(CELL)
            await nbc.cell(CELL)
        if case.prelude:
            await plain.cell(case.prelude, SETUP_TIMEOUT)
            await nbc.cell(case.prelude, SETUP_TIMEOUT)
        await steady(nbc, result, "before the setup cell")

        plain_setup = await plain.cell(case.setup, SETUP_TIMEOUT)
        stored = nbc.store_bytes()
        t0 = time.perf_counter()
        nbc_setup = await nbc.cell(case.setup, SETUP_TIMEOUT)
        committed, quiet = await steady(nbc, result, "setup cell")
        result.setup = SetupTiming(
            plain_setup,
            nbc_setup,
            committed - t0,
            None if quiet is None else max(quiet, committed) - t0,
            nbc.store_bytes() - stored,
        )

        for _ in range(warmup):
            await plain.cell(CELL)
            await nbc.cell(CELL)
        await steady(nbc, result, "after the warm-up")
        stored = nbc.store_bytes()
        for _ in range(repeat):
            result.plain.append(await plain.cell(CELL))
            result.nbc.append(await nbc.cell(CELL))
        if not await nbc.committed():
            result.notes.append("the last cell's state was not committed")
        result.stored_during = nbc.store_bytes() - stored

        result.memory = {
            "plain": rss([plain.pid] if plain.pid else []),
            "nbcluster": rss(nbc.pids),
        }
        result.notes += [f"cell warned: {w}" for w in nbc.warnings]
        problems = nbc.log_problems(logs)
        result.notes += [f"replica log: {p}" for p in problems[:5]]
        if len(problems) > 5:
            result.notes.append(f"replica log: ... {len(problems) - 5} more such lines")
    finally:
        await plain.stop()
        await nbc.stop()
    return result


# -- output -----------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "MISSED"


def report(results: list[CaseResult], repeat: int) -> None:
    by_key = {r.case.key: r for r in results}
    for what in ("idle", "reply"):
        print()
        print(
            f"{CELL} round trip, execute_request -> {what}"
            f"{' status' if what == 'idle' else ''} (ms; {repeat} cells a side, alternating)"
        )
        rows = []
        for r in results:
            nbc = [getattr(t, what) for t in r.nbc]
            plain = [getattr(t, what) for t in r.plain]
            ratio = percentile(nbc, 50) / percentile(plain, 50)
            rows.append(
                [
                    r.case.key,
                    r.case.label,
                    ms(percentile(nbc, 50)),
                    ms(percentile(nbc, 95)),
                    ms(percentile(plain, 50)),
                    ms(percentile(plain, 95)),
                    f"{ratio:.2f}",
                    verdict(ratio, TARGET_RATIO),
                ]
            )
        headers = ["case", "namespace", "nbc p50", "nbc p95", "plain p50", "plain p95", "ratio"]
        print(table([*headers, f"<= {TARGET_RATIO}"], rows))
        if "a" in by_key:
            base = percentile([getattr(t, what) for t in by_key["a"].nbc], 50)
            for key in ("b", "c1", "c2", "d"):
                if key in by_key:
                    p50 = percentile([getattr(t, what) for t in by_key[key].nbc], 50)
                    target = (
                        f"(target <= {TARGET_NAMESPACE_RATIO}: "
                        f"{verdict(p50 / base, TARGET_NAMESPACE_RATIO)})"
                        if key.startswith("c")
                        else ""
                    )
                    print(f"  nbcluster p50 ({key})/(a): {p50 / base:6.2f}   {target}".rstrip())

    print()
    print(
        "setup cell (ms from the request): plain reply/idle; nbcluster reply/idle, state"
        " committed, replicas quiet; bytes added to the object store"
    )
    rows = []
    for r in results:
        s = r.setup
        if s is None:
            continue
        rows.append(
            [
                r.case.key,
                r.case.setup if len(r.case.setup) <= 40 else r.case.setup[:37] + "...",
                ms(s.plain.reply),
                ms(s.plain.idle),
                ms(s.nbc.reply),
                ms(s.nbc.idle),
                ms(s.committed),
                ms(s.quiet),
                f"{s.stored / MIB:.1f} MiB",
                f"{s.nbc.idle / s.plain.idle:.2f}",
            ]
        )
    print(
        table(
            [
                "case",
                "cell",
                "plain reply",
                "plain idle",
                "nbc reply",
                "nbc idle",
                "committed",
                "quiet",
                "stored",
                "idle ratio",
            ],
            rows,
        )
    )
    shown = next((k for k in ("c2", "c1") if k in by_key and by_key[k].setup), None)
    if shown is not None:
        s = by_key[shown].setup
        assert s is not None
        committed = s.committed or s.nbc.idle
        print()
        print(f"where the time of the setup cell of ({shown}) goes ({by_key[shown].case.setup})")
        steps = [
            ("request -> reply: the code ran", s.nbc.reply, s.plain.reply),
            (
                "reply -> idle: capture on the executor",
                s.nbc.idle - s.nbc.reply,
                s.plain.idle - s.plain.reply,
            ),
            ("idle -> committed: the Raft log", committed - s.nbc.idle, None),
            (
                "committed -> quiet: followers load it",
                None if s.quiet is None else s.quiet - committed,
                None,
            ),
        ]
        for label, nbc, plain in steps:
            tail = "" if plain is None else f"   plain {ms(plain):>9} ms"
            print(f"  {label:44s} nbcluster {ms(nbc):>9} ms{tail}")
        print(f"  {'bytes added to the object store':44s} {s.stored / MIB:19.1f} MiB")

    print()
    print(
        "after the timed cells: resident memory (RSS; nbcluster: the three replicas together),"
        " and what the object store grew by during them"
    )
    for r in results:
        if r.memory:
            print(
                f"  ({r.case.key})".ljust(7) + f"plain {r.memory['plain'] / MIB:8.1f} MiB"
                f"   nbcluster {r.memory['nbcluster'] / MIB:8.1f} MiB"
                f"   store +{r.stored_during / MIB:.2f} MiB in {len(r.nbc)} cells"
            )
    notes = [(r.case.key, n) for r in results for n in r.notes]
    if notes:
        print()
        print("notes")
        for key, note in notes:
            print(f"  ({key}) {note}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, help="cells a side per case (default 30; quick 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed cells a side per case")
    parser.add_argument("--cases", default="a,b,c1,c2,d", help="which cases, comma-separated")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer cells")
    parser.add_argument(
        "--random", action="store_true", help="random arrays instead of np.ones (incompressible)"
    )
    parser.add_argument(
        "--log", type=Path, help="append the cluster's logs (gateway, hosts) to this file"
    )
    args = parser.parse_args()
    repeat = args.repeat or (8 if args.quick else 30)
    chosen = {c.strip() for c in args.cases.split(",") if c.strip()}
    selected = [c for c in cases(args.quick, args.random) if c.key in chosen]
    if unknown := chosen - {c.key for c in selected}:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        print(f"nbcluster up --hosts {REPLICAS} --replicas {REPLICAS} ...", flush=True)
        cluster = start_cluster(state, hosts=REPLICAS, replicas=REPLICAS, log=args.log)
        try:
            async with GatewayClient(cluster.url, cluster.token, timeout=120) as gw:
                deadline = time.monotonic() + 60
                while sum(h["state"] == "connected" for h in await gw.hosts()) < REPLICAS:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the hosts did not connect within 60 s")
                    await asyncio.sleep(0.1)
                for case in selected:
                    print(f"({case.key}) {case.label}: {case.setup}", flush=True)
                    started = time.perf_counter()
                    result = await run_case(gw, state, case, repeat, args.warmup)
                    results.append(result)
                    idle = percentile([t.idle for t in result.nbc], 50)
                    plain = percentile([t.idle for t in result.plain], 50)
                    print(
                        f"    idle p50 nbcluster {ms(idle)} ms, plain {ms(plain)} ms"
                        f"   ({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
        finally:
            cluster.stop()
    report(results, repeat)


if __name__ == "__main__":
    asyncio.run(main())
