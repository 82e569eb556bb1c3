"""The kernel replica: an IPython kernel that is one of a kernel's replicas.

Alone (one replica, or messages without nbcluster metadata) it behaves exactly like ipykernel.
In a replica group it joins the group's Raft log when the gateway sends
``nbcluster_raft_start_request``, and then:

* ``execute_request`` (this replica is the gateway's target): propose ``lead`` for the term,
  wait for the committed decision, wait until the state of earlier cells is applied, execute,
  reply, and then (off the critical path) append ``done`` with the cell's state update. If
  another replica's lead for the term committed first, reply ``ExecutionYieldError`` instead.
* The GPUs the gateway bound to the cell (``metadata["nbcluster"]["gpus"]``, with or without a
  term) are visible to the cell while it runs on the replica that runs it (see ``_gpus``).
* The other replicas receive nothing for the cell: they apply ``done`` records of other
  replicas to their namespace as they commit.
* GPU memory follows the binding (``_device_memory``): before a cell with GPUs bound, the bound
  device is made current in the GPU frameworks (``_cuda``) and the namespace's evicted tensors
  (and those on devices not bound to it) are moved onto the bound devices; the reply of a
  kernel that has imported a GPU framework says what its namespace holds on each device
  (``nbcluster.device_memory``); ``nbcluster_evict_request`` (control) moves it to host memory.

Over 500 lines, knowingly: everything ipykernel calls (its shell and control handler tables,
``do_execute``, ``pre_handler_hook``, ``do_shutdown``) must be a method of this one class,
and each stays a few lines that hand the work to the modules beside it (``_group``, ``_sync``,
``_election``, ``_gpus``, ``_device_memory``, ``_interrupts``); what is left is the order of one
cell's steps, which reads best in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ipykernel.ipkernel import IPythonKernel
from traitlets import Unicode

from .. import envvars, runtime
from .._version import __version__
from ..protocol import (
    CONTROL_ERROR_ENAME,
    METADATA_KEY,
    YIELD_ENAME,
    CheckpointReply,
    CheckpointRequest,
    ControlErrorReply,
    ControlMessageError,
    ControlReply,
    ControlRequest,
    DeviceMemory,
    EvictReply,
    EvictRequest,
    ExecuteMetadata,
    ExecutionYielded,
    LogStatus,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
    ReplicaInfo,
    RestorePoint,
    parse_execute_metadata,
    parse_request,
)
from ._cuda import init_driver, install_import_hook, make_current
from ._device_memory import NamespaceDeviceMemory, describe_restore
from ._device_torch import default_frameworks, gpu_framework_imported
from ._gpus import cell_gpus, strip_cpu_magic, use_nvml_device_order
from ._host_copies import SyncedHostCopies
from ._interrupts import DeferredInterrupt
from ._records import Proposal
from ._seal import derive_state_key
from ._touched import bound_names
from ._transform import TransformOnce

__all__ = ["ReplicaKernel"]

log = logging.getLogger(__name__)

#: How long a proposal may take to commit before the replica gives up on the cell.
PROPOSE_TIMEOUT = 10.0
#: How long the executor waits for earlier cells' state before running anyway (with a warning).
CATCH_UP_TIMEOUT = 5.0
#: Refused objects a restore names to the gateway at most (the replica's log has them all).
MAX_REFUSED_NAMED = 100

_Request = TypeVar("_Request", bound=ControlRequest)


class ReplicaKernel(IPythonKernel):
    """One replica of a distributed kernel. Started by a host daemon via :mod:`nbcluster.kernel`."""

    implementation = "nbcluster"
    implementation_version = __version__
    banner = f"nbcluster replica kernel {__version__} (IPython)"

    kernel_id = Unicode(
        envvars.KERNEL_ID.get() or "", help="The kernel this replica belongs to."
    ).tag(config=True)
    replica_id = Unicode(envvars.REPLICA_ID.get() or "", help="This replica's id.").tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.shell is not None:
            from ._magics import JobMagics

            self.shell.register_magics(JobMagics(self.shell))  # %%job and %jobs
            # ``%%cpu``: the gateway ran the cell without GPUs; here it is a plain cell.
            self.shell.input_transformers_cleanup.insert(0, strip_cpu_magic)
        self.transforms = TransformOnce(self.shell) if self.shell is not None else None
        self.shell_handlers[RaftStartRequest.msg_type] = self.nbcluster_raft_start_request
        self.shell_handlers[MembershipRequest.msg_type] = self.nbcluster_membership_request
        # On control: a long cell on shell must not hold a checkpoint up.
        self.control_handlers[CheckpointRequest.msg_type] = self.nbcluster_checkpoint_request
        self.control_handlers[EvictRequest.msg_type] = self.nbcluster_evict_request
        self.replication: Any = None  # a _ReplicaGroup once the Raft log is started
        #: (term, status, raw source, source as IPython ran it or None) of the cell whose
        #: effect the executor replicates once its reply is out
        self._finish_after_reply: tuple[int, str, str, str | None] | None = None
        self.interrupts = DeferredInterrupt()
        runtime._mark_kernel()
        use_nvml_device_order()  # before any cell can initialise CUDA
        # Every device of the host visible to the process for its life, whatever the first
        # cell that uses CUDA is bound to (see ``_cuda``); and torch/CuPy imported by a cell
        # start on the bound device.
        init_driver()
        install_import_hook()
        self.device_memory = NamespaceDeviceMemory(
            self._namespace_values, default_frameworks, host_copies=SyncedHostCopies()
        )

    @property
    def kernel_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(super().kernel_info)
        group = self.replication
        info[METADATA_KEY] = ReplicaInfo(
            kernel_id=self.kernel_id,
            replica_id=self.replica_id,
            replicated=group is not None,
            last_term=group.coordinator.done_term if group else 0,
        ).model_dump(mode="json")
        return info

    # -- group membership ---------------------------------------------------------------------

    async def nbcluster_raft_start_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Join the kernel's replica group (the gateway forming or repairing it)."""

        async def join(request: RaftStartRequest) -> RaftStartReply:
            from ._group import ReplicaGroup

            if self.replication is None:
                self.replication = await ReplicaGroup.start(
                    self,
                    address=request.address,
                    peers=request.peers,
                    members=request.members,
                    password=envvars.RAFT_PASSWORD.get() or "",
                    # The kernel's Jupyter key (connection file), which every replica of the
                    # kernel is given: the state key is derived from it (``_seal``).
                    state_key=derive_state_key(self.session.key if self.session else b""),
                    object_store_url=envvars.STORE_URL.get() or None,
                )
            await self.replication.wait_for_leader(request.timeout)
            if request.restore:
                # Every replica of the kernel was lost: start from what the store kept.
                rebuilt = await self.replication.restore_from_store(request.timeout)
                restored = (
                    None
                    if rebuilt is None
                    else RestorePoint(
                        term=rebuilt.term,
                        execution_count=rebuilt.execution_count,
                        checkpoint_created=rebuilt.checkpoint_created,
                        later_cells=rebuilt.applied,
                        refused=list(rebuilt.refused[:MAX_REFUSED_NAMED]),
                    )
                )
                return RaftStartReply(log=self._log_status(), restored=restored)
            # Whatever committed before we joined (snapshot and tail) is applied before we
            # answer, so the gateway never picks a replica that is behind as executor.
            await self.replication.catch_up(request.timeout)
            return RaftStartReply(log=self._log_status())

        await self._control_request(stream, ident, parent, RaftStartRequest, join)

    async def nbcluster_membership_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Replace members of the group's Raft log (the gateway replacing a lost replica)."""

        async def change(request: MembershipRequest) -> MembershipReply:
            if self.replication is None:
                raise RuntimeError("this replica is not in a replica group")
            await self.replication.change_members(request.remove, request.add, request.timeout)
            return MembershipReply(log=self._log_status())

        await self._control_request(stream, ident, parent, MembershipRequest, change)

    async def nbcluster_checkpoint_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Write a checkpoint of the synchronised state to the store now (the gateway's
        ``POST /api/cluster/kernels/{id}/checkpoint``)."""

        async def checkpoint(request: CheckpointRequest) -> CheckpointReply:
            if self.replication is None:
                raise RuntimeError(
                    "this kernel is not replicated: checkpoints need a replica group"
                )
            # Every cell the gateway has seen answered is in it.
            after = request.after_term
            if not await self.replication.coordinator.caught_up(after, CATCH_UP_TIMEOUT):
                raise RuntimeError(f"the state of term {after} has not arrived here yet")
            written = await self.replication.write_checkpoint()
            return CheckpointReply(log=self._log_status(), **written)

        await self._control_request(stream, ident, parent, CheckpointRequest, checkpoint)

    async def nbcluster_evict_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Move the GPU memory the namespace holds on the named devices to host memory (the
        scheduler gives a device to another kernel); it comes back before the next cell with
        GPUs bound."""

        async def evict(request: EvictRequest) -> EvictReply:
            log.info("evicting GPU memory of devices %s: %s", request.devices, request.reason)
            # In a worker thread: moving gigabytes must not hold up the control channel.
            done = await asyncio.to_thread(self.device_memory.evict, request.devices)
            return EvictReply(
                freed_bytes=done.freed_bytes,
                moved_objects=done.moved_objects,
                seconds=done.seconds,
            )

        await self._control_request(stream, ident, parent, EvictRequest, evict)

    def _namespace_values(self) -> Iterator[object]:
        """The values of the user's names (and ``Out``), where device memory is looked for."""
        shell = self.shell
        if shell is None:
            return
        hidden = shell.user_ns_hidden
        for name, value in list(shell.user_ns.items()):
            if name not in hidden or name == "Out":
                yield value

    def _log_status(self) -> LogStatus:
        """The group's Raft log as this replica sees it, for an ``ok`` control reply."""
        if self.replication is None:
            raise RuntimeError("this replica is not in a replica group")
        return LogStatus.model_validate(self.replication.log.status())

    async def _control_request(
        self,
        stream: Any,
        ident: Any,
        parent: Any,
        model: type[_Request],
        action: Callable[[_Request], Awaitable[ControlReply]],
    ) -> None:
        """Run a group operation the gateway asked for and answer ok (with the log's status)
        or with the error: a malformed request is answered with a ``ControlMessageError``
        that names what is wrong, and the replica goes on serving."""
        reply: ControlReply | ControlErrorReply
        try:
            request = parse_request(model, parent.get("content"))
        except ControlMessageError as exc:
            log.warning("%s", exc)
            reply = ControlErrorReply(ename=CONTROL_ERROR_ENAME, evalue=str(exc))
        else:
            try:
                reply = await action(request)
            except Exception as exc:
                log.exception("%s failed", model.msg_type.removesuffix("_request"))
                reply = ControlErrorReply(ename=type(exc).__name__, evalue=str(exc))
        self._send(stream, model.reply_type, reply.model_dump(mode="json"), parent, ident)

    # -- execution ----------------------------------------------------------------------------

    @staticmethod
    def _term_of(parent: dict[str, Any]) -> ExecuteMetadata | None:
        """The term the gateway sent with the cell (``metadata.nbcluster``); None without one
        (a kernel of one replica, a client's own request). The GPU binding is left out: it is
        read apart (``cell_gpus``), and an invalid one only warns. Raises
        ``ControlMessageError`` naming what is wrong with a malformed one."""
        metadata = parent.get("metadata")
        meta = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
        if not isinstance(meta, dict) or "term" not in meta:
            return None
        return parse_execute_metadata(metadata, gpus=False)

    def set_parent(self, ident: Any, parent: Any, channel: str = "shell") -> None:
        """Called by ipykernel when a request arrives, before it publishes ``busy``: from
        then on a SIGINT is for this request (``_interrupts``). Comm messages, which
        ipykernel dispatches while a cell runs, and subshells' requests are not cells here."""
        super().set_parent(ident, parent, channel)
        if channel != "shell":
            return
        header = parent.get("header") if isinstance(parent, dict) else None
        if not isinstance(header, dict) or str(header.get("msg_type", "")).startswith("comm_"):
            return
        self.interrupts.request_received(str(header.get("msg_id", "")))

    def pre_handler_hook(self) -> None:
        """Called by ipykernel before each shell handler: SIGINT is recorded, not raised,
        until the cell's code runs (see ``_interrupts``); ipykernel's ``post_handler_hook``
        restores the handler saved here."""
        self.saved_sigint_handler = self.interrupts.defer()

    async def execute_request(self, stream: Any, ident: Any, parent: Any) -> None:
        self._finish_after_reply = None
        if self.transforms is not None:
            self.transforms.forget()
        await super().execute_request(stream, ident, parent)
        finish = self._finish_after_reply
        if finish is not None and self.replication is not None:
            term, status, code, transformed = finish
            # After the reply went out: replicate this cell's effect.
            self.replication.finish(term, status, self.shell.execution_count - 1, code, transformed)

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        parent = self.get_parent("shell")
        group = self.replication
        try:
            term_meta = self._term_of(parent) if group is not None else None
        except ControlMessageError as exc:
            log.warning("%s", exc)
            return self._error_reply(CONTROL_ERROR_ENAME, str(exc))
        if term_meta is None or term_meta.term is None or group is None:
            return await self._run(
                code, silent, store_history, user_expressions, allow_stdin, cell_meta, cell_id
            )
        term = term_meta.term
        attempt = term_meta.attempt or 1
        msg_id = parent["header"]["msg_id"]
        transformed = self.transforms.prepare(code) if self.transforms is not None else None
        prepared_at = group.coordinator.states_loaded
        proposal = Proposal(
            "lead", term, attempt, self.replica_id, msg_id, tuple(bound_names(transformed or code))
        )
        coordinator = group.coordinator

        def earlier_winner() -> str | None:
            """The replica that won an earlier attempt of this term, if one did."""
            return next(
                (
                    w
                    for (t, a), w in coordinator.decisions.items()
                    if t == term and a < attempt and w
                ),
                None,
            )

        decided_earlier = False
        try:
            if attempt > 1:
                # The gateway sends a cell again under a new attempt when the replica it sent
                # it to was lost. If that replica had won the term (the cell had started
                # there), the election ignores later attempts' leads: no decision for this
                # attempt ever comes, and waiting for one ended in ReplicaGroupUnavailable
                # after the proposal timeout. Once our lead has committed, every record
                # before it is applied here, so an earlier winner is known by then.
                await group.propose(proposal, PROPOSE_TIMEOUT)
                winner = earlier_winner()
                decided_earlier = winner is not None
                if winner is None:
                    winner = await coordinator.decision(term, attempt, PROPOSE_TIMEOUT)
            else:
                winner = await group.elect(proposal)
        except (TimeoutError, RuntimeError) as exc:
            return self._error_reply(
                "ReplicaGroupUnavailable", f"the replicas could not agree on this cell: {exc}"
            )
        if decided_earlier or winner != self.replica_id:
            # (An earlier attempt won by this very replica ran or runs here already.)
            # IPythonKernel's execution_count is the shell's: nothing ran here, so the shell
            # did not count this request. A cell cut off on the replica that won the term
            # (its state never arrives: the term did not complete) was counted there, as a
            # local kernel counts an interrupted cell; this replica runs the next cells, so
            # it counts it too.
            completed = coordinator.done_term >= term
            if decided_earlier and not completed and store_history and not silent and self.shell:
                self.shell.execution_count += 1
            # ``completed``: the winner's state of this cell arrived (it ran to the end).
            return self._yield_reply(term, winner, completed)
        after = term - 1 if term_meta.after_term is None else term_meta.after_term
        if not await group.coordinator.caught_up(after, CATCH_UP_TIMEOUT):
            names = group.coordinator.bound_by(after)
            lost = (
                "; the names it set keep their values from before that cell (or are not "
                f"defined), run that cell again: {', '.join(names)}"
                if names
                else ""
            )
            self.send_stream_warning(
                f"[nbcluster] the state of an earlier cell (term {after}) has not arrived from "
                "the replica that ran it (it was probably lost with that replica), so this "
                f"cell runs with the state this replica has{lost}\n"
            )
        # Values that arrived incomplete (autograd graphs) are rebuilt by running their cells
        # again, here only: this replica is the one that needs them (``_recompute``).
        rebuilt = False
        for notice in group.sync.rebuild_incomplete():
            self.send_stream_warning(notice)
            rebuilt = True
        if self.transforms is not None and (
            rebuilt or group.coordinator.states_loaded != prepared_at
        ):
            # The namespace changed since the transform (``_transform``): IPython's again.
            self.transforms.forget()
            transformed = None
        # Interpreter state from the replicas that ran the previous cells (decimal context,
        # print options ...) must be restored in the context this cell runs in.
        for problem in group.sync.environment.restore_pending():
            self.send_stream_warning(f"[nbcluster] could not restore {problem}\n")
        if self.interrupts.take():
            # Interrupted while the replicas elected it: the cell never starts, and its term
            # completes (with nothing changed) so the other replicas go on to the next cell.
            reply = self._interrupted_reply(silent, store_history)
        else:
            try:
                reply = await self._run(
                    code, silent, store_history, user_expressions, allow_stdin, cell_meta, cell_id
                )
            finally:
                if self.transforms is not None:
                    self.transforms.forget()
        self._finish_after_reply = (term, str(reply.get("status", "ok")), code, transformed)
        reply.setdefault(METADATA_KEY, {})
        return reply

    async def _run(
        self,
        code: str,
        silent: bool,
        store_history: bool,
        user_expressions: dict[str, Any] | None,
        allow_stdin: bool,
        cell_meta: dict[str, Any] | None,
        cell_id: str | None,
    ) -> dict[str, Any]:
        """Run the cell here, with the GPUs the gateway bound to it (if it said which): the
        first bound device current, the namespace's device memory moved onto the bound devices
        first, and what it holds afterwards in the reply. SIGINT interrupts it, and only it
        (``_interrupts``)."""
        parent = self.get_parent("shell")
        with (
            self.interrupts.interruptible(),
            cell_gpus(parent.get("metadata"), self.send_stream_warning) as devices,
        ):
            if devices:
                for problem in make_current(devices):
                    self.send_stream_warning(f"[nbcluster] {problem}\n")
            try:
                restored = self.device_memory.begin_cell(devices)
            except Exception as exc:
                log.exception("moving GPU memory onto devices %s failed", devices)
                self.send_stream_warning(
                    "[nbcluster] could not move the namespace's tensors to GPU "
                    f"{', '.join(map(str, devices or ()))}: {exc}\n"
                )
            else:
                if restored is not None:
                    self.send_stream_warning(describe_restore(restored))
            try:
                result: dict[str, Any] = await super().do_execute(
                    code,
                    silent,
                    store_history=store_history,
                    user_expressions=user_expressions,
                    allow_stdin=allow_stdin,
                    cell_meta=cell_meta,
                    cell_id=cell_id,
                )
            finally:
                self.device_memory.end_cell()
        if gpu_framework_imported():
            try:
                held = self.device_memory.held()
            except Exception:
                log.exception("could not measure the namespace's GPU memory")
            else:
                piece = DeviceMemory(held={str(d): n for d, n in held.items()})
                block = result.setdefault(METADATA_KEY, {})
                block[DeviceMemory.key] = piece.model_dump(mode="json")
        return result

    def _yield_reply(self, term: int, winner: str | None, completed: bool) -> dict[str, Any]:
        who = f"replica {winner}" if winner else "no replica (every replica yielded)"
        return self._error_reply(
            YIELD_ENAME, f"replica {self.replica_id} did not execute term {term}: {who} did"
        ) | ExecutionYielded(winner=winner, completed=completed).model_dump(mode="json")

    def _interrupted_reply(self, silent: bool, store_history: bool) -> dict[str, Any]:
        """What a local kernel answers for a cell interrupted before its first line: counted,
        a ``KeyboardInterrupt`` error on iopub and in the reply."""
        if self.shell is not None and store_history and not silent:
            self.shell.execution_count += 1
        reply = self._error_reply("KeyboardInterrupt", "interrupted before the cell started")
        if not silent:
            self._send(
                self.iopub_socket,
                "error",
                {k: reply[k] for k in ("ename", "evalue", "traceback")},
                self.get_parent("shell"),
                self._topic("error"),
            )
        return reply

    def _error_reply(self, ename: str, evalue: str) -> dict[str, Any]:
        return {
            "status": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": [f"{ename}: {evalue}"],
            "execution_count": self.shell.execution_count - 1 if self.shell else 0,
            "user_expressions": {},
            "payload": [],
        }

    def _send(
        self,
        stream: Any,
        msg_type: str,
        content: dict[str, Any],
        parent: Any,
        ident: Any,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        session = self.session
        assert session is not None
        session.send(stream, msg_type, content, parent, ident=ident, metadata=metadata)

    def send_stream_warning(self, text: str) -> None:
        """Write a warning into the current cell's output (stderr stream)."""
        self._send(
            self.iopub_socket,
            "stream",
            {"name": "stderr", "text": text},
            self.get_parent("shell"),
            self._topic("stream"),
        )

    def do_shutdown(self, restart: bool) -> Any:
        if self.replication is not None:
            self.replication.close_soon()
        return super().do_shutdown(restart)
