"""The simulated-time engine: a heap of timed events (no sockets, no sleeps) that drives the
gateway's own :class:`~nbcluster.scheduling.Scheduler`, policies and auto-scaling rule
(``scaling_decision``) through a workload, the way the gateway's driver and auto-scaler do.

``nbcluster simulate`` calls :func:`simulate` once per policy. What the engine does for the
gateway's slow parts (``docs/simulation.md``, "What is simulated"):

* a kernel is placed when its session opens (``KernelRequested``; the policy decides the
  replicas); refused with a scale-out under way, it is placed again once a host arrives
  (the gateway waits for one host), else it is refused with all its cells;
* each cell is sent at its time (``ExecutionRequested``, preferring the replica that ran the
  kernel's last cell); the scheduler binds it, migrates a replica for it (the cell starts
  ``migration_seconds`` later) or makes it wait; it ends ``duration`` after it started
  (``ExecutionFinished``); cells of one kernel run one at a time, in order;
* auto-scaling: the scheduler's reactive ``ScaleOut`` and the periodic rounds of
  ``scaling_decision`` start hosts that register ``host_start_seconds`` later; a round's
  ``ScaleIn`` removes idle hosts. Rounds run every ``scaling_interval`` while anything
  changes (a round that decides nothing on an unchanged cluster decides nothing again);
* idle reclamation (replicated kernels, as in the gateway): ``KernelStopped`` after
  ``reclaim_idle_after`` idle seconds, and a new placement at the next cell, which starts
  ``restore_seconds`` later;
* ``Evict`` is answered at once as done (traces carry no GPU memory reports).

The event loop, the carrying out of actions and the per-kernel state they share are here;
what a replay measures (GPU- and host-seconds, delays, counts, the timeline) and the summary
made of it are in ``_accounting``, which the loop feeds.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..scheduling import (
    Action,
    BindGpus,
    Event,
    Evict,
    EvictionFinished,
    ExecutionFinished,
    ExecutionRequested,
    HostAdded,
    HostRemoved,
    KernelRequested,
    KernelStopped,
    Migrate,
    PlaceReplicas,
    RefuseCell,
    ReleaseGpus,
    ScaleIn,
    ScaleOut,
    Scheduler,
    SchedulerConfig,
    policy_named,
    scaling_decision,
)
from ._accounting import Accounting
from ._recorder import RecordingScheduler, recording_scheduler
from ._results import PolicyOutcome
from ._settings import SimulationSettings, simulated_host_spec
from ._workload import Cell, Session, Workload

__all__ = ["Progress", "simulate"]

#: Called now and then with (simulated seconds done, simulated seconds in all).
Progress = Callable[[float, float], None]

# Kinds of timed events; at equal times the lower kind goes first (a cell that ends frees
# its GPUs before one sent at that instant asks; a session closes after its last cell).
_FINISH, _HOST_UP, _RESTORED, _OPEN, _RETRY, _CELL, _CLOSE, _RECLAIM, _ROUND = range(9)

# A session's kernel: waiting to be placed again (a host is starting), placed, reclaimed while
# idle, placed again after a reclaim and being restored, refused, closed.
_OPENING, _PLACED, _RECLAIMED, _WARMING, _REFUSED, _CLOSED = range(6)

_PROGRESS_EVERY = 8192


@dataclass(slots=True)
class _InFlight:
    """A cell given to the scheduler and not finished."""

    cell: Cell
    submit: float
    started: bool = False


@dataclass(slots=True)
class _Live:
    index: int
    session: Session
    state: int = _OPENING
    closing: bool = False
    #: Placement was tried again after a scale-out (the gateway tries once more).
    retried: bool = False
    #: Its replicas were released while idle; the next placement restores it.
    reclaimed: bool = False
    next_cell: int = 0
    term: int = 0
    inflight: dict[int, _InFlight] = field(default_factory=dict)
    #: Cells sent while the kernel is being placed or restored: (cell, sent at).
    held: list[tuple[Cell, float]] = field(default_factory=list)
    #: When the last started cell ends (the next one cannot start before).
    busy_until: float = -math.inf
    last_replica: str | None = None
    #: Bumped by every cell: a reclaim check scheduled before it is stale.
    idle_version: int = 0
    #: GPUs bound to the kernel for its life (reservation).
    lifelong: bool = False


class _Replay:
    def __init__(
        self,
        workload: Workload,
        policy: str,
        settings: SimulationSettings,
        record: Path | None,
        check: bool,
    ) -> None:
        self.workload = workload
        self.policy = policy_named(policy)
        self.settings = settings
        self.check = check
        config = SchedulerConfig(
            max_subscription_ratio=settings.max_subscription_ratio,
            replicas_per_kernel=settings.replicas_per_kernel,
        )
        self.recording: RecordingScheduler | None = None
        if record is not None:
            self.recording = recording_scheduler(config, record, clock=lambda: self.now)
        self.scheduler: Scheduler = self.recording or Scheduler(config)
        self.start = workload.sessions[0].opens if workload.sessions else 0.0
        self.now = self.start
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        #: Open sessions only (a closed one is forgotten: memory follows what is open).
        self.lives: dict[str, _Live] = {}
        self.by_index: dict[int, _Live] = {}
        width = max(workload.span / settings.timeline_points, 60.0)
        self.acct = Accounting(self.start, width)
        # auto-scaling
        self.scaling = settings.cluster.scaling
        self.starting: deque[float] = deque()
        self.round_armed = False
        #: Hosts the auto-scaler started that registered (they are named after the count).
        self.started_hosts = 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self, progress: Progress | None) -> None:
        sessions = self.workload.sessions
        span = max(self.workload.span, 1.0)
        for host in self.settings.cluster.hosts:
            self._add_host(
                host.name, HostAdded(host.name, host.spec, host.gpu_devices, host.device_vram)
            )
        self.acct.hosts_min = self.acct.host_count
        following = 0
        popped = 0
        heap = self.heap
        while heap or following < len(sessions):
            while following < len(sessions) and (
                not heap or sessions[following].opens <= heap[0][0]
            ):
                self._push(sessions[following].opens, _OPEN, following)
                following += 1
            when, kind, _, index, extra = heapq.heappop(heap)
            self._advance(when)
            popped += 1
            if progress is not None and popped % _PROGRESS_EVERY == 0:
                progress(self.now - self.start, span)
            if kind == _FINISH:
                self._finish(index, extra)
            elif kind == _CELL:
                self._cell(index, extra)
            elif kind == _OPEN:
                self._open(index)
            elif kind == _CLOSE:
                if (live := self.by_index.get(index)) is not None:
                    live.closing = True
                    self._maybe_close(live)
            elif kind == _HOST_UP:
                self._host_up()
            elif kind == _ROUND:
                self._round()
            elif kind == _RECLAIM:
                self._reclaim(index, extra)
            elif kind == _RETRY:
                if (live := self.by_index.get(index)) is not None and live.state == _OPENING:
                    self._place(live)
            elif kind == _RESTORED and (live := self.by_index.get(index)) is not None:
                self._restored(live)
            if self.check:
                self._check()
        if progress is not None:
            progress(span, span)
        if self.recording is not None:
            self.recording.close()

    def _push(self, when: float, kind: int, index: int, extra: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, kind, self.seq, index, extra))

    def _advance(self, when: float) -> None:
        if when < self.now:
            when = self.now
        self.acct.advance(self.now, when)
        self.now = when

    def _handle(self, event: Event) -> list[Action]:
        self.acct.events += 1
        if self.scaling is not None and not self.round_armed:
            self.round_armed = True
            interval = self.settings.scaling_interval
            self._push((math.floor(self.now / interval) + 1) * interval, _ROUND, 0)
        return self.scheduler.handle(event)

    # -- sessions -----------------------------------------------------------------------------

    def _open(self, index: int) -> None:
        session = self.workload.sessions[index]
        live = _Live(index, session)
        self.by_index[index] = live
        self.lives[session.session_id] = live
        self._push(session.closes, _CLOSE, index)
        self._place(live)
        if live.state != _REFUSED and session.cells:
            self._push(session.cells[0].submit, _CELL, index, 0)

    def _place(self, live: _Live) -> None:
        """Place (or restore) the kernel; on a refusal wait for a starting host once."""
        restoring = live.reclaimed
        session = live.session
        actions = self._handle(
            KernelRequested(session.session_id, session.request, None, self.policy.name)
        )
        placed = any(type(a) is PlaceReplicas for a in actions)
        self._carry_out(actions)
        if placed:
            live.retried = False
            live.last_replica = None
            if restoring:
                live.state = _WARMING
                self._push(self.now + self.settings.restore_seconds, _RESTORED, live.index)
            else:
                live.state = _PLACED
                self._release_held(live)
                self._idle(live)
            return
        if not live.retried and self.starting:
            live.retried = True
            live.state = _OPENING
            self._push(self.starting[0], _RETRY, live.index)
            return
        if not restoring:
            self.acct.sessions_refused += 1
        unsent = len(session.cells) - live.next_cell
        self.acct.cells_refused += unsent + len(live.held)
        live.held.clear()
        live.next_cell = len(session.cells)
        live.state = _REFUSED

    def _restored(self, live: _Live) -> None:
        if live.state != _WARMING:
            return
        live.state = _PLACED
        live.reclaimed = False
        self._release_held(live)
        self._idle(live)

    def _release_held(self, live: _Live) -> None:
        held, live.held = live.held, []
        for cell, sent in held:
            self._send(live, cell, sent)

    def _maybe_close(self, live: _Live) -> None:
        if (
            not live.closing
            or live.inflight
            or live.held
            or live.next_cell < len(live.session.cells)
            or live.state in (_CLOSED, _WARMING)
        ):
            return
        if live.state == _PLACED:
            self._carry_out(self._handle(KernelStopped(live.session.session_id)))
        live.state = _CLOSED
        del self.lives[live.session.session_id]
        del self.by_index[live.index]

    def _idle(self, live: _Live) -> None:
        """The kernel has nothing to run: close it, or schedule its idle reclamation."""
        if live.inflight or live.state != _PLACED:
            return
        self._maybe_close(live)
        after = self.settings.reclaim_idle_after
        if live.state == _PLACED and after is not None and self.policy.replicas > 1:
            self._push(self.now + after, _RECLAIM, live.index, live.idle_version)

    def _reclaim(self, index: int, version: int) -> None:
        live = self.by_index.get(index)
        if live is None or live.state != _PLACED or live.inflight or version != live.idle_version:
            return
        self._carry_out(self._handle(KernelStopped(live.session.session_id)))
        live.state = _RECLAIMED
        live.reclaimed = True
        self.acct.reclaims += 1

    # -- cells --------------------------------------------------------------------------------

    def _cell(self, index: int, number: int) -> None:
        live = self.by_index.get(index)
        if live is None:
            return  # closed (refused, then its time ran out)
        cells = live.session.cells
        if number + 1 < len(cells):
            self._push(cells[number + 1].submit, _CELL, index, number + 1)
        if live.state in (_REFUSED, _CLOSED):
            return
        live.next_cell = number + 1
        cell = cells[number]
        if live.state == _PLACED:
            self._send(live, cell, self.now)
            return
        live.held.append((cell, self.now))
        if live.state == _RECLAIMED:
            self._place(live)

    def _send(self, live: _Live, cell: Cell, sent: float) -> None:
        live.term += 1
        live.idle_version += 1
        live.inflight[live.term] = _InFlight(cell, sent)
        gpus = 0 if cell.gpus == 0 else None
        self._carry_out(
            self._handle(
                ExecutionRequested(live.session.session_id, live.term, live.last_replica, gpus)
            )
        )

    def _finish(self, index: int, term: int) -> None:
        live = self.by_index[index]  # a session with a running cell stays open
        live.inflight.pop(term, None)
        self._carry_out(self._handle(ExecutionFinished(live.session.session_id, term)))
        self._idle(live)

    def _started(self, bind: BindGpus, migrated: bool) -> None:
        assert bind.term is not None
        live = self.lives[bind.kernel_id]
        flight = live.inflight.get(bind.term)
        if flight is None or flight.started:
            return
        flight.started = True
        ready = max(flight.submit, live.busy_until)
        start = max(
            self.now + (self.settings.migration_seconds if migrated else 0.0), live.busy_until
        )
        self.acct.cell_started(start - ready, flight.cell.gpus, flight.cell.duration)
        live.busy_until = start + flight.cell.duration
        live.last_replica = bind.replica_id
        self._push(live.busy_until, _FINISH, live.index, bind.term)

    # -- actions ------------------------------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        migrated: set[str] = set()
        for action in actions:
            kind = type(action)
            if kind is BindGpus:
                assert isinstance(action, BindGpus)
                live = self.lives.get(action.kernel_id)
                if action.term is None:
                    self.acct.bind(action.kernel_id, len(action.device_indices))
                    if live is not None:
                        live.lifelong = True
                    continue
                if live is not None and not live.lifelong:
                    self.acct.bind(action.kernel_id, len(action.device_indices))
                self._started(action, action.replica_id in migrated)
            elif kind is ReleaseGpus:
                assert isinstance(action, ReleaseGpus)
                self.acct.release(action.kernel_id)
                if action.term is None and (live := self.lives.get(action.kernel_id)):
                    live.lifelong = False
            elif kind is Migrate:
                assert isinstance(action, Migrate)
                self.acct.migrations += 1
                migrated.add(action.new_replica_id)
            elif kind is ScaleOut:
                assert isinstance(action, ScaleOut)
                self._scale_out(action.count)
            elif kind is Evict:
                assert isinstance(action, Evict)
                done = EvictionFinished(
                    action.kernel_id, action.replica_id, action.device_indices, True
                )
                self._carry_out(self._handle(done))
            elif kind is RefuseCell:
                assert isinstance(action, RefuseCell)
                live = self.lives.get(action.kernel_id)
                if live is not None and live.inflight.pop(action.term, None) is not None:
                    self.acct.cells_refused += 1
                    self._idle(live)
            # PlaceReplicas and RejectKernel are read by _place; WaitForGpus and CancelWait
            # need nothing (a cell waits until a BindGpus comes); jobs are not simulated.

    # -- hosts and auto-scaling -----------------------------------------------------------------

    def _add_host(self, name: str, event: HostAdded) -> None:
        self._carry_out(self._handle(event))
        self.acct.host_added(event.spec.gpus)

    def _scale_out(self, count: int) -> None:
        if self.scaling is None:
            return
        present = self.acct.host_count + len(self.starting)
        count = min(count, self.scaling.max_hosts - present)
        for _ in range(max(count, 0)):
            arrives = self.now + self.settings.host_start_seconds
            self.starting.append(arrives)
            self._push(arrives, _HOST_UP, 0)
            self.acct.hosts_started += 1

    def _host_up(self) -> None:
        assert self.scaling is not None
        self.starting.popleft()
        self.started_hosts += 1
        name = f"auto-{self.started_hosts}"
        self._add_host(name, HostAdded(name, simulated_host_spec(self.scaling.gpus_per_host)))

    def _round(self) -> None:
        """One auto-scaling round, as the gateway's ``Autoscaler.round``."""
        assert self.scaling is not None
        self.round_armed = False
        summary = self.scheduler.summary()
        starting = len(self.starting)
        summary = dataclasses.replace(
            summary,
            hosts=summary.hosts + starting,
            gpu_capacity=summary.gpu_capacity + starting * self.scaling.gpus_per_host,
        )
        decision = scaling_decision(summary, self.scaling)
        if isinstance(decision, ScaleOut):
            self._scale_out(decision.count)
        elif isinstance(decision, ScaleIn):
            self._scale_in(decision.hosts)
        if decision is not None and not self.round_armed:
            self.round_armed = True
            self._push(self.now + self.settings.scaling_interval, _ROUND, 0)

    def _scale_in(self, names: tuple[str, ...]) -> None:
        for name in names:
            view = self.scheduler.host(name)
            if view is None or view.replicas or view.bound or view.jobs:
                continue
            self._carry_out(self._handle(HostRemoved(name)))
            self.acct.host_removed(view.spec.gpus)

    # -- results ------------------------------------------------------------------------------

    def _check(self) -> None:
        """Test mode: the engine's accounting agrees with the scheduler's."""
        summary = self.scheduler.summary()
        acct = self.acct
        assert summary.committed_gpus == acct.committed, (summary, acct.committed)
        assert summary.hosts == acct.host_count and summary.gpu_capacity == acct.capacity

    def outcome(self, seconds: float) -> PolicyOutcome:
        simulated = max(self.now - self.start, 0.0)
        unfinished = sum(len(live.inflight) + len(live.held) for live in self.lives.values())
        return self.acct.outcome(self.policy.name, self.workload, simulated, unfinished, seconds)


def simulate(
    workload: Workload,
    policy: str,
    settings: SimulationSettings | None = None,
    *,
    progress: Progress | None = None,
    record: Path | None = None,
    check: bool = False,
) -> PolicyOutcome:
    """Replay ``workload`` under ``policy`` (a name of ``nbcluster.scheduling.POLICIES``;
    ``ValueError`` otherwise). ``record``: also write the scheduler's events and decisions
    there (``_recording``'s format, simulated seconds as times). ``check``: verify the
    engine's GPU accounting against the scheduler's after every event (tests)."""
    replay = _Replay(workload, policy, settings or SimulationSettings(), record, check)
    started = time.perf_counter()
    replay.run(progress)
    return replay.outcome(time.perf_counter() - started)
