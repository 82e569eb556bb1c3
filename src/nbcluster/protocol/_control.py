"""The gateway ↔ replica control protocol: nbcluster's own messages inside Jupyter messages.

Besides the Jupyter messages it routes for clients, the gateway talks to each replica kernel
with messages of its own, on the replica's ZMQ sockets like any Jupyter message. Each is a
pydantic model here, built and serialised (``.model_dump(mode="json")``) by the gateway into
the message's content or metadata, and parsed (``Model.model_validate``, through
:func:`parse_request` / :func:`parse_reply`) by the replica, which answers a malformed request
with a :class:`ControlErrorReply` naming what is wrong and keeps serving:

* ``nbcluster_raft_start_request`` (shell): :class:`RaftStartRequest`, answered by
  ``nbcluster_raft_start_reply``: :class:`RaftStartReply`;
* ``nbcluster_membership_request`` (shell): :class:`MembershipRequest`, answered by
  ``nbcluster_membership_reply``: :class:`MembershipReply`;
* ``nbcluster_checkpoint_request`` (control, so that a running cell does not hold it up):
  :class:`CheckpointRequest`, answered by ``nbcluster_checkpoint_reply``:
  :class:`CheckpointReply`;
* ``nbcluster_evict_request`` (control, likewise): :class:`EvictRequest`, answered by
  ``nbcluster_evict_reply``: :class:`EvictReply` (the replica moves the GPU memory its namespace
  holds on the named devices to host memory).

Every reply is either the ``ok`` model named above or a :class:`ControlErrorReply`
(``status: "error"``, as a Jupyter error reply). And on standard Jupyter messages:

* ``execute_request`` metadata ``nbcluster``: :class:`ExecuteMetadata` (the term the replicas
  elect an executor for, and the GPUs bound to the cell);
* an ``execute_reply`` of a replica that did not run the cell (``ename``
  ``ExecutionYieldError``) carries :class:`ExecutionYielded`'s fields besides the standard ones;
* ``kernel_info_reply`` content ``nbcluster``: :class:`ReplicaInfo`;
* the ``execute_reply`` of the replica that ran the cell, content ``nbcluster`` key
  ``device_memory`` (only once the kernel has imported a GPU framework): :class:`DeviceMemory`.

Models whose only sender is nbcluster forbid unknown fields (``extra="forbid"``) and coerce no
value (``strict``): a field one side renamed or retyped fails loudly instead of being read as
its default. Two are lenient on purpose:
:class:`LogStatus` (diagnostics that differ by consensus backend) and :class:`ExecuteMetadata`
(a client's own ``nbcluster`` metadata reaches a kernel that runs one replica unchanged).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
)

from ._errors import ProtocolError

__all__ = [
    "CONTROL_ERROR_ENAME",
    "METADATA_KEY",
    "YIELD_ENAME",
    "CheckpointReply",
    "CheckpointRequest",
    "ControlErrorReply",
    "ControlMessageError",
    "ControlReply",
    "ControlRequest",
    "DeviceMemory",
    "EvictReply",
    "EvictRequest",
    "ExecuteMetadata",
    "ExecutionYielded",
    "LogStatus",
    "MembershipReply",
    "MembershipRequest",
    "RaftStartReply",
    "RaftStartRequest",
    "ReplicaInfo",
    "RestorePoint",
    "check_gpus",
    "parse_execute_metadata",
    "parse_reply",
    "parse_request",
    "read_device_memory",
    "read_yielded",
]

#: The key of nbcluster's part of a message's metadata (``execute_request``) or content
#: (``kernel_info_reply``, ``execute_reply``).
METADATA_KEY = "nbcluster"
#: ``ename`` of the error reply to a malformed control message.
CONTROL_ERROR_ENAME = "ControlMessageError"
#: ``ename`` of the execute reply of a replica that did not run the cell.
YIELD_ENAME = "ExecutionYieldError"


class ControlMessageError(ProtocolError):
    """A control message (or nbcluster's part of a Jupyter message) is malformed; the text
    names the message and each field that is wrong."""


class _Ours(BaseModel):
    """A message only nbcluster sends: unknown fields are an error, and values are not
    coerced (``"3"`` is not an int: the sender has a bug)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _RequestModel(_Ours):
    """A control request: its message type and its reply's."""

    msg_type: ClassVar[str]
    reply_type: ClassVar[str]


class _ReplyModel(_Ours):
    """The ``ok`` reply to a control request."""

    msg_type: ClassVar[str]


# -- pieces -----------------------------------------------------------------------------------


class LogStatus(BaseModel):
    """A replica's Raft log as it sees it (``ReplicatedLog.status()``), in every ``ok`` reply.

    Only ``members`` is decided on (the gateway checks a new member's view of its group);
    the rest is diagnostics, which differ by consensus backend and are kept as they come.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    members: list[str]
    leader: str | None = None


class RestorePoint(_Ours):
    """What a replica rebuilt from the object store (``RaftStartRequest.restore``)."""

    term: int = Field(ge=0)
    execution_count: int = Field(ge=0)
    #: When the checkpoint was written (unix time); None: rebuilt from the log tail alone.
    checkpoint_created: float | None = None
    #: Cells of the store's log tail applied after the checkpoint.
    later_cells: int = Field(0, ge=0)
    #: Store keys of objects left out because they failed authentication (forged, altered,
    #: unsigned) or their checksum (docs/security.md, "Signed state").
    refused: list[str] = Field(default_factory=list)


# -- requests (gateway → replica) and their ok replies ----------------------------------------


class RaftStartRequest(_RequestModel):
    """Join the kernel's replica group: start this replica's Raft node at ``address`` with
    ``peers`` (which include it) and wait for a leader. Sent to every replica when the gateway
    forms the group (``restore``: rebuild the state from the store first) and to a replacement
    after the membership change that makes room for it."""

    msg_type: ClassVar[str] = "nbcluster_raft_start_request"
    reply_type: ClassVar[str] = "nbcluster_raft_start_reply"

    address: str = Field(min_length=1)
    peers: list[str] = Field(min_length=1)
    #: The group's size (the election's majority is counted from it).
    members: int = Field(ge=1)
    #: Seconds to wait for a leader (and, with ``restore``, for the rebuilt state).
    timeout: float = Field(10.0, gt=0)
    restore: bool = False


class RaftStartReply(_ReplyModel):
    msg_type: ClassVar[str] = "nbcluster_raft_start_reply"

    status: Literal["ok"] = "ok"
    log: LogStatus
    #: With ``restore``: what was rebuilt (None: the store holds nothing of this kernel).
    restored: RestorePoint | None = None


class MembershipRequest(_RequestModel):
    """Change the group's Raft membership (one change at a time: first ``remove``, then
    ``add``). Empty lists: change nothing, answer with the log's status (the gateway reads
    the membership that way)."""

    msg_type: ClassVar[str] = "nbcluster_membership_request"
    reply_type: ClassVar[str] = "nbcluster_membership_reply"

    remove: list[str] = Field(default_factory=list)
    add: list[str] = Field(default_factory=list)
    timeout: float = Field(20.0, gt=0)


class MembershipReply(_ReplyModel):
    msg_type: ClassVar[str] = "nbcluster_membership_reply"

    status: Literal["ok"] = "ok"
    log: LogStatus


class CheckpointRequest(_RequestModel):
    """Write a checkpoint of the kernel's state to the store now, once the state of term
    ``after_term`` (the last cell whose reply the gateway saw) is applied here."""

    msg_type: ClassVar[str] = "nbcluster_checkpoint_request"
    reply_type: ClassVar[str] = "nbcluster_checkpoint_reply"

    after_term: int = Field(0, ge=0)


class CheckpointReply(_ReplyModel):
    msg_type: ClassVar[str] = "nbcluster_checkpoint_reply"

    status: Literal["ok"] = "ok"
    log: LogStatus
    term: int = Field(ge=0)
    execution_count: int = Field(ge=0)
    #: When it was written (unix time).
    created: float
    #: Its size in bytes.
    size: int = Field(ge=0)


class EvictRequest(_RequestModel):
    """Free GPU memory: move every object of the kernel's namespace that holds memory on one of
    ``devices`` (the host's physical, NVML, indices; empty: every device) to host memory and
    release the framework's cached memory. The objects keep their identity and are moved back,
    onto the devices then bound, before the kernel's next cell that has GPUs bound. Sent on
    control, so that a running cell does not hold it up; a device bound to the cell running
    now is refused (an error reply), and with ``devices`` empty the running cell's devices are
    left as they are."""

    msg_type: ClassVar[str] = "nbcluster_evict_request"
    reply_type: ClassVar[str] = "nbcluster_evict_reply"

    devices: list[Annotated[int, Field(ge=0)]]
    #: Why (for the replica's log), e.g. "GPU 0 goes to kernel k2".
    reason: str = ""

    @field_validator("devices")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"a device appears more than once in {_show(value)}")
        return value


class EvictReply(_ReplyModel):
    msg_type: ClassVar[str] = "nbcluster_evict_reply"

    status: Literal["ok"] = "ok"
    #: Bytes of device memory the moved objects held (each storage counted once).
    freed_bytes: int = Field(ge=0)
    #: Objects (tensors, parameters, gradients, optimizer state) moved to host memory.
    moved_objects: int = Field(ge=0)
    #: How long moving them and releasing the cache took.
    seconds: float = Field(ge=0)


class ControlErrorReply(_Ours):
    """The reply to a control request that failed or was malformed (``ename``
    ``ControlMessageError``), as a Jupyter error reply."""

    status: Literal["error"] = "error"
    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


ControlRequest = RaftStartRequest | MembershipRequest | CheckpointRequest | EvictRequest
ControlReply = RaftStartReply | MembershipReply | CheckpointReply | EvictReply

# -- on standard Jupyter messages -------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_gpus(value: Any) -> tuple[int, ...]:
    """A cell's GPU binding (``metadata.nbcluster.gpus``): distinct non-negative ints.

    Raises ValueError saying what is wrong with ``value`` (shortened when long)."""
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"expected a list of GPU indices, got {type(value).__name__} {_show(value)}"
        )
    devices: list[int] = []
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(
                f"item {position} of {_show(value)} is {type(item).__name__} {_show(item)}, "
                "not an int"
            )
        if item < 0:
            raise ValueError(f"item {position} of {_show(value)} is negative ({item})")
        if item in devices:
            raise ValueError(f"device {item} appears more than once in {_show(value)}")
        devices.append(item)
    return tuple(devices)


class ExecuteMetadata(BaseModel):
    """``metadata["nbcluster"]`` of the ``execute_request`` the gateway sends a replica.

    Absent fields are not sent (:meth:`dump`): a kernel that runs one replica gets no term,
    and a cell the gateway binds no GPUs to no ``gpus`` (``[]`` binds none explicitly).
    Unknown fields are ignored: on a kernel of one replica the gateway passes a client's own
    ``nbcluster`` metadata through unchanged.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: The kernel's execution index that the replicas elect an executor for.
    term: StrictInt | None = Field(None, ge=1)
    #: 1, or more when the cell is sent again after the replica it went to was lost.
    attempt: StrictInt | None = Field(None, ge=1)
    #: The last term whose reply the gateway saw: its state must be applied before this runs.
    after_term: StrictInt | None = Field(None, ge=0)
    #: The host's (NVML) indices of the GPUs bound to this cell (absent: the gateway says
    #: nothing about GPUs; an explicit null is malformed, as for every field here).
    gpus: Annotated[tuple[int, ...] | None, BeforeValidator(check_gpus)] = None

    @field_validator("term", "attempt", "after_term", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("null: leave the field out instead")
        return value

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent fields are not sent, so that what is sent validates again.
        return {k: v for k, v in handler(self).items() if v is not None}

    def dump(self) -> dict[str, Any]:
        """The JSON form (``model_dump(mode="json")``), without the fields that are not set."""
        return self.model_dump(mode="json")


class ExecutionYielded(BaseModel):
    """The fields a replica adds to its ``ExecutionYieldError`` execute reply (the rest of
    the reply is a standard Jupyter error reply, so other fields are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    yielded: Literal[True] = True
    #: The replica that won the term (None: every replica yielded).
    winner: str | None = None
    #: Whether the winner's state of this cell had arrived: it ran to the end.
    completed: StrictBool = False


class ReplicaInfo(_Ours):
    """``kernel_info_reply``'s ``nbcluster`` part: which replica answers, and the last term
    whose state it has applied (a restarted gateway continues the terms from there)."""

    kernel_id: str
    replica_id: str
    replicated: bool
    last_term: int = Field(ge=0)


def _device_key(key: str) -> str:
    if not (key.isascii() and key.isdigit()) or (len(key) > 1 and key[0] == "0"):
        raise ValueError(f"device {_show(key)} is not a physical device index ('0', '1', ...)")
    return key


class DeviceMemory(_Ours):
    """``execute_reply`` content ``nbcluster`` key ``device_memory`` of the replica that ran
    the cell (sent once the kernel has imported a GPU framework, absent before): the GPU
    memory the kernel's namespace holds after the cell."""

    #: The key of this piece in the reply's ``nbcluster`` block.
    key: ClassVar[str] = "device_memory"

    #: Physical (NVML) device index, as a string ("0"), to the bytes of device memory the
    #: objects reachable from the namespace hold there (devices holding none are left out).
    held: dict[Annotated[str, AfterValidator(_device_key)], Annotated[int, Field(ge=0)]]


def read_device_memory(content: Any) -> DeviceMemory | None:
    """The :class:`DeviceMemory` of an ``execute_reply``'s content; None when it has none (a
    kernel that has not imported a GPU framework, a replica that did not run the cell) or a
    malformed one (the caller then knows nothing new)."""
    block = content.get(METADATA_KEY) if isinstance(content, dict) else None
    piece = block.get(DeviceMemory.key) if isinstance(block, dict) else None
    if piece is None:
        return None
    try:
        return DeviceMemory.model_validate(piece)
    except ValidationError:
        return None


# -- parsing ----------------------------------------------------------------------------------


def describe(exc: ValidationError, limit: int = 5) -> str:
    """Each problem as ``field: what is wrong (got value)``, for an error reply or a log."""
    problems = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "content"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "value_error", "extra_forbidden"):
            message += f" (got {_show(err.get('input'))})"
        problems.append(f"{where}: {message}")
    more = len(exc.errors()) - limit
    if more > 0:
        problems.append(f"and {more} more")
    return "; ".join(problems)


_Request = TypeVar("_Request", bound=_RequestModel)
_Reply = TypeVar("_Reply", bound=_ReplyModel)


def parse_request(model: type[_Request], content: Any) -> _Request:
    """Read a control request's content; raises :class:`ControlMessageError` naming the
    message and what is wrong with it."""
    try:
        return model.model_validate(content)
    except ValidationError as exc:
        raise ControlMessageError(f"malformed {model.msg_type}: {describe(exc)}") from None


def parse_reply(model: type[_Reply], content: Any) -> _Reply | ControlErrorReply:
    """Read a control reply's content: the ``ok`` model, or the error the replica answered.

    A malformed reply is returned as a :class:`ControlErrorReply` (``ControlMessageError``)
    naming what is wrong, so that callers have one failure path."""
    error = isinstance(content, dict) and content.get("status") == "error"
    try:
        return ControlErrorReply.model_validate(content) if error else model.model_validate(content)
    except ValidationError as exc:
        kind = "error reply to" if error else "reply to"
        request = model.msg_type.removesuffix("_reply") + "_request"
        return ControlErrorReply(
            ename=CONTROL_ERROR_ENAME, evalue=f"malformed {kind} {request}: {describe(exc)}"
        )


def parse_execute_metadata(metadata: Any, *, gpus: bool = True) -> ExecuteMetadata | None:
    """nbcluster's part of an ``execute_request``'s metadata; None when it has none (a request
    as any Jupyter client sends it). Raises :class:`ControlMessageError` naming what is wrong.

    ``gpus=False`` leaves the cell's GPU binding out (``gpus`` is None): the replica reads it
    apart (``kernel._gpus.cell_gpus``), warning about an invalid one and running the cell
    without it, while a wrong term cannot be run around.
    """
    meta = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(meta, dict):
        return None
    if not gpus:
        meta = {k: v for k, v in meta.items() if k != "gpus"}
    try:
        return ExecuteMetadata.model_validate(meta)
    except ValidationError as exc:
        raise ControlMessageError(
            f"malformed execute_request metadata {METADATA_KEY}: {describe(exc)}"
        ) from None


def read_yielded(content: dict[str, Any]) -> ExecutionYielded | None:
    """The yield fields of an execute reply; None when the replica did not yield (it ran the
    cell, or failed otherwise). Malformed ones read as a yield with nothing known (the cell
    is taken as not completed: the cautious reading)."""
    if content.get("ename") != YIELD_ENAME:
        return None
    try:
        return ExecutionYielded.model_validate(content)
    except ValidationError:
        return ExecutionYielded()
