"""A replica's membership in its kernel's replica group: the Raft log, the coordinator that
turns committed records into decisions, and the synchroniser that moves Python state.

Created by :class:`~._kernel.ReplicaKernel` when the gateway asks it to join (on the kernel's
main event loop, where cells run). The group sees the kernel only through :class:`GroupKernel`
(what it reads and tells), so that this module does not import the kernel's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import envvars
from .._tasks import BackgroundTasks
from ._checkpoint import Rebuilt, encode_checkpoint, log_key, rebuild
from ._records import Done, Mark, Proposal, Record, encode_record
from ._replication import ReplicaCoordinator
from ._seal import Refusals
from ._sealed import SealedLog, SealedLogState, SealedStore
from ._stored import NoAuthenticState, read_state, write_checkpoint

if TYPE_CHECKING:
    from ..consensus import ReplicatedLog
    from ._sync import SyncResult

__all__ = ["GroupKernel", "ReplicaGroup"]

log = logging.getLogger(__name__)

PROPOSE_TIMEOUT = 10.0
#: The executor writes a checkpoint after this many of its cells, or when the last one is
#: older than ``CHECKPOINT_INTERVAL`` seconds (each cell's state change is in the store's log
#: tail meanwhile; a checkpoint compacts it).
CHECKPOINT_EVERY = envvars.CHECKPOINT_EVERY.get_int()
CHECKPOINT_INTERVAL = envvars.CHECKPOINT_INTERVAL.get_float()


class GroupKernel(Protocol):
    """What a replica group needs of its kernel (``ReplicaKernel``)."""

    @property
    def kernel_id(self) -> str: ...

    @property
    def replica_id(self) -> str: ...

    @property
    def shell(self) -> Any:
        """The IPython shell (None before the kernel has one)."""

    #: The kernel's count of cells (a follower sets it from the executor's).
    execution_count: Any

    def send_stream_warning(self, text: str) -> None:
        """Show ``text`` on the current cell's stderr."""


class ReplicaGroup:
    """``sealed``: the coordinator as the Raft log sees it (records open before it decodes
    them); ``log`` seals what this replica proposes, and ``sync.object_store`` is sealed
    too, so that everything this replica loads was written by its kernel's replicas
    (``_seal``)."""

    def __init__(
        self,
        kernel: GroupKernel,
        coordinator: ReplicaCoordinator,
        sync: Any,
        sealed: SealedLogState,
    ) -> None:
        self.kernel = kernel
        self.coordinator = coordinator
        self.sync = sync
        self.sealed = sealed
        #: Forged or altered objects this replica refused (store and Raft log alike).
        self.refusals = sealed.refusals
        self.log: ReplicatedLog = None  # type: ignore[assignment]  # set by start()
        self._tasks = BackgroundTasks("replica group", log)
        #: The last ``done`` proposal: the next waits for it, so that they commit in order.
        self._last_done: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._cells_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # A threading lock: checkpoints are written from the main loop (after cells) and from
        # the control thread's loop (the gateway's request).
        self._checkpoint_lock = threading.Lock()

    @classmethod
    async def start(
        cls,
        kernel: GroupKernel,
        *,
        address: str,
        peers: list[str],
        members: int,
        password: str,
        state_key: bytes,
        object_store_url: str | None,
    ) -> ReplicaGroup:
        """``state_key``: the kernel's key for its state (``_seal.derive_state_key``), the same
        on every replica of the kernel."""
        from ..consensus import PySyncObjLog, private_random_for_pysyncobj
        from ..store import open_store
        from ._sync import StateSynchronizer

        loop = asyncio.get_running_loop()
        shell = kernel.shell
        assert shell is not None
        refusals = Refusals()
        object_store = SealedStore(
            open_store(object_store_url or (Path.cwd() / ".nbcluster-store").as_uri()),
            state_key,
            refusals,
        )
        # One key space per kernel, so that a kernel's objects go when it does (store gc).
        prefix = f"kernels/{kernel.kernel_id}/values/" if kernel.kernel_id else "values/"
        # Values pickled larger than this go to the store (gateway: --store-threshold-mb).
        threshold = envvars.STORE_THRESHOLD.get_int()
        sync = StateSynchronizer(
            shell.user_ns,
            shell.user_ns_hidden,  # by reference: IPython adds to it as it runs
            object_store,
            threshold=threshold,
            key_prefix=prefix,
            shell=shell,
        )
        group: ReplicaGroup
        coordinator = ReplicaCoordinator(
            kernel.replica_id, members, loop, lambda p, n: group.apply_state(p, n)
        )
        sealed = SealedLogState(coordinator, state_key, refusals)
        group = cls(kernel, coordinator, sync, sealed)
        private_random_for_pysyncobj()  # the notebook's random.seed() is the notebook's own
        raft = PySyncObjLog(address, [p for p in peers if p != address], password, sealed)
        group.log = SealedLog(raft, state_key)
        return group

    async def propose(self, record: Record, timeout: float) -> None:
        """Append a record and wait for its commit (``self.log`` seals it)."""
        await self.log.propose(encode_record(record), timeout)

    async def wait_for_leader(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.log.status().get("leader"):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no Raft leader among the replicas after {timeout:g} s")
            await asyncio.sleep(0.02)

    async def catch_up(self, timeout: float) -> None:
        """Return once this replica has applied every record committed before now."""
        await self.propose(Mark(self.kernel.replica_id, uuid.uuid4().hex), timeout)

    async def change_members(self, remove: list[str], add: list[str], timeout: float) -> None:
        """Raft membership changes, one at a time: first drop the dead, then add the new."""
        for address in remove:
            if address in self.log.status().get("members", ()):
                await self.log.remove_member(address, timeout)
        for address in add:
            if address not in self.log.status().get("members", ()):
                await self.log.add_member(address, timeout)

    async def elect(self, proposal: Proposal) -> str | None:
        """Propose and return the committed winner of the proposal's term and attempt."""
        await self.propose(proposal, PROPOSE_TIMEOUT)
        return await self.coordinator.decision(proposal.term, proposal.attempt, PROPOSE_TIMEOUT)

    def finish(
        self,
        term: int,
        status: str,
        execution_count: int,
        code: str,
        transformed: str | None = None,
    ) -> None:
        """After the executor replied: capture the cell's effect now (before the next cell can
        change it) and append it to the log in the background. ``transformed``: the source as
        IPython ran it, when the kernel has it (``_transform``); else transformed here."""
        if transformed is None:
            transformed = self._transformed(code)
        filename = self._cell_filename(code, transformed, execution_count)
        try:
            result = self.sync.capture(
                execution_count, transformed, filename, raw=code, ran=status == "ok"
            )
        except Exception:
            log.exception("could not capture the state of term %d", term)
            result = None
        payload = getattr(result, "payload", None)
        if result is not None:
            before = set(self._warned)
            self._warn_about(result)
            told = sorted(self._warned - before)
            if told:
                # The other replicas learn what the user was told: once per kernel, not once
                # per replica that executes.
                payload = dict(payload or {"count": execution_count, "set": [], "del": []})
                payload["told"] = told
        failed = getattr(result, "failed", None) or {}
        unstored = sorted(n for n, why in failed.items() if why.startswith("object store"))
        if unstored:
            self.kernel.send_stream_warning(
                "[nbcluster] the object store could not take these large values, so they are "
                f"not protected yet: {', '.join(unstored)} ({failed[unstored[0]]}). They live on "
                "this replica only; a later cell stores them once the store is back.\n"
            )
        from ._sync import encode_payload

        record = Done(
            term,
            self.kernel.replica_id,
            status,
            execution_count,
            encode_payload(payload) if payload else None,
        )
        previous = self._last_done
        self._last_done = self._tasks.spawn(
            f"propose done {term}", self._propose_done(record, previous)
        )

    def _warn_about(self, result: SyncResult) -> None:
        """Tell the user, once per name, what will not survive a failover and why; and where
        the cell's package installs run."""
        unpicklable = [n for n in result.unpicklable_new if n not in self._warned]
        widgets = [n for n in unpicklable if self._is_widget(n)]
        others = [n for n in unpicklable if n not in widgets]
        if others:
            self._warned.update(others)
            self.kernel.send_stream_warning(
                "[nbcluster] these variables cannot be copied to the other replicas and will "
                f"not survive a failover: {', '.join(sorted(others))}\n"
            )
        if widgets:
            self._warned.update(widgets)
            if "widgets" not in self._warned:
                self._warned.add("widgets")
                self.kernel.send_stream_warning(
                    "[nbcluster] widgets live in the replica that runs the cell: after a "
                    "failover, existing widgets stop responding (run their cells again). "
                    "Told once per kernel.\n"
                )
        # One line per reason, the names last (after the colon), as in the other warnings.
        by_reason: dict[str, list[str]] = {}
        rebuilt = "; a replica that takes over rebuilds them by running this cell again"
        for name, why in sorted(result.lossy.items()):
            if f"lossy:{name}:{why}" not in self._warned:
                self._warned.add(f"lossy:{name}:{why}")
                reason = why + rebuilt if name in result.recomputable else why
                by_reason.setdefault(reason, []).append(name)
        for why, names in by_reason.items():
            self.kernel.send_stream_warning(
                f"[nbcluster] copied to the other replicas without {why}: {', '.join(names)}\n"
            )
        commands = result.environment.commands
        if commands:
            others_count = max(self.coordinator.election.members - 1, 0)
            listing = "; ".join(c.describe() for c in commands)
            self.kernel.send_stream_warning(
                f"[nbcluster] {listing}: ran on this replica's host; the {others_count} other "
                "replicas run it as they apply this cell, and replicas that join later too.\n"
            )
        problems = [p for p in result.environment.problems if f"env:{p}" not in self._warned]
        for problem in problems:
            self._warned.add(f"env:{problem}")
            self.kernel.send_stream_warning(
                f"[nbcluster] not copied to the other replicas: {problem}\n"
            )

    def _is_widget(self, name: str) -> bool:
        value = self.sync.namespace.get(name)
        module = type(value).__module__ or ""
        return module.startswith(("ipywidgets", "bqplot", "ipyleaflet", "plotly.graph_objs"))

    def _transformed(self, code: str) -> str:
        """The cell as IPython compiles it (magics as calls), for the state analysis."""
        shell = self.kernel.shell
        if shell is None:
            return code
        with contextlib.suppress(Exception):
            return str(shell.transform_cell(code))
        return code

    def _cell_filename(self, code: str, transformed: str, execution_count: int) -> str:
        compiler = getattr(self.kernel.shell, "compile", None)
        get_name = getattr(compiler, "get_code_name", None)
        if get_name is None:
            return "<cell>"
        with contextlib.suppress(Exception):
            return str(get_name(code, transformed, execution_count))
        return "<cell>"

    async def _propose_done(self, record: Done, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # A ``done`` that commits after a later term's is ignored by every replica (its
            # term counts as completed): the state of that cell would never reach them. The
            # next cell normally waits for this one's ``done`` anyway (``caught_up``), but not
            # past its timeout, and a proposal that is retried may commit late.
            await asyncio.wait([previous])
        data = encode_record(record)
        try:
            await self.log.propose(data, PROPOSE_TIMEOUT)
        except Exception as exc:
            log.error("could not replicate the state of term %d: %s", record.term, exc)
            return
        kernel_id = self.kernel.kernel_id
        if not kernel_id:
            return
        # The store keeps the log's tail too: it outlives every replica. (Sealed again, for
        # its store key: a record authentic in the log cannot be stored under another term.)
        try:
            await asyncio.to_thread(
                self.sync.object_store.put, log_key(kernel_id, record.term), data
            )
        except Exception as exc:
            log.warning("could not write term %d to the store's log: %s", record.term, exc)
            return
        self._cells_since_checkpoint += 1
        due = time.monotonic() - self._last_checkpoint > CHECKPOINT_INTERVAL
        if self._cells_since_checkpoint >= CHECKPOINT_EVERY or due:
            try:
                await self.write_checkpoint()
            except Exception as exc:
                log.warning("could not write a checkpoint: %s", exc)

    async def write_checkpoint(self) -> dict[str, Any]:
        """Write the merged state to ``kernels/K/checkpoints/<term>`` and drop what it makes
        unnecessary (``_stored.write_checkpoint``). Called after the executor's cells (every
        few) and by ``nbcluster_checkpoint_request`` (the gateway's checkpoint API)."""
        kernel_id = self.kernel.kernel_id
        if not kernel_id:
            raise RuntimeError("this replica does not know its kernel id")
        object_store = self.sync.object_store

        def write() -> tuple[int, int, float, int]:
            with self._checkpoint_lock:
                coordinator = self.coordinator
                term, count = coordinator.done_term, coordinator.done_count
                snapshot = coordinator.snapshot()
                created = time.time()
                data = encode_checkpoint(snapshot, term, count, self.kernel.replica_id, created)
                write_checkpoint(object_store, kernel_id, term, data)
                self._cells_since_checkpoint = 0
                self._last_checkpoint = time.monotonic()
                return term, count, created, len(data)

        term, count, created, size = await asyncio.to_thread(write)
        log.info("checkpoint of term %d written (%d bytes)", term, size)
        return {"term": term, "execution_count": count, "created": created, "size": size}

    async def restore_from_store(self, timeout: float) -> Rebuilt | None:
        """Rebuild this replica's state from the store's checkpoint and log tail (the kernel
        lost every replica; the gateway starts new ones with ``restore``). Every new replica
        does the same and reads the same objects, so they start identical.

        Only authentic objects are used (``_stored`` says what happens to the others); the
        result names every object refused, the large values refused while the state was
        loaded included (their variables are missing). None: the store holds nothing of this
        kernel. Raises :class:`~._stored.NoAuthenticState` when it holds nothing authentic."""
        kernel_id = self.kernel.kernel_id
        object_store = self.sync.object_store
        mark = self.refusals.mark()

        def read() -> tuple[Rebuilt | None, dict[str, str]]:
            stored = read_state(object_store, kernel_id)
            members = self.coordinator.election.members
            return rebuild(stored.checkpoint, stored.entries, members), stored.refused

        rebuilt, refused = await asyncio.to_thread(read)
        if rebuilt is None:
            if refused:
                raise NoAuthenticState(
                    "nothing of this kernel in the object store is authentic: "
                    + "; ".join(f"{key}: {why}" for key, why in refused.items())
                )
            return None
        self.coordinator.restore(rebuilt.snapshot)
        await self.coordinator.caught_up(rebuilt.term, timeout)
        # Values the restored state points to were opened as it was loaded, just now.
        later = [k for k in self.refusals.since(mark) if k not in refused]
        rebuilt = dataclasses.replace(rebuilt, refused=(*refused, *later))
        # New members get the restored state from a snapshot, not from an empty log.
        compact = getattr(self.log, "compact", None)
        if compact is not None:
            with contextlib.suppress(Exception):
                compact()
        log.info(
            "restored from the store: term %d (checkpoint %s, %d later cells, %d refused)",
            rebuilt.term,
            "none" if rebuilt.checkpoint_created is None else "found",
            rebuilt.applied,
            len(rebuilt.refused),
        )
        return rebuilt

    def apply_state(self, payload: dict[str, Any] | None, count: int) -> None:
        """A follower applies another replica's cell (or a snapshot's full state)."""
        if payload is not None:
            try:
                self.sync.apply(payload)
            except Exception:
                log.exception("could not apply a state update")
            else:
                self._warned.update(k for k in payload.get("told", ()) if isinstance(k, str))
        shell = self.kernel.shell
        if count and shell is not None:
            self.kernel.execution_count = count
            shell.execution_count = count + 1

    def close_soon(self) -> None:
        """Close the Raft log in the background (the kernel is shutting down)."""
        try:
            self._tasks.spawn("close the Raft log", self.log.close())
        except RuntimeError:  # no running event loop: nothing to close it on
            log.warning("could not close the Raft log: no running event loop")
