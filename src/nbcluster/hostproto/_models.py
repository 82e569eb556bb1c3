"""Messages between the gateway and host daemons, carried as JSON text frames on one websocket
that the host daemon opens to the gateway (``/api/cluster/hosts/connect``).

Requests carry a ``request_id``; the host answers each with a :class:`Reply` of the same id.
Events (heartbeats, replica exits) carry none.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "MAX_FRAME_BYTES",
    "POOL_NAME",
    "PROTOCOL_VERSION",
    "ConnectionInfo",
    "GatewayMessage",
    "GpuInfo",
    "Heartbeat",
    "Hello",
    "HostMessage",
    "HostProtocolError",
    "HostResources",
    "ReplicaExited",
    "ReplicaReport",
    "Reply",
    "SignalReplica",
    "StartReplica",
    "StopReplica",
    "Welcome",
    "check_pool",
    "decode_gateway_message",
    "decode_host_message",
    "encode",
]

PROTOCOL_VERSION = 1

#: The largest frame a host daemon accepts (its websocket ``max_size``); the gateway refuses
#: to send a larger one (a host closes its connection on it).
MAX_FRAME_BYTES = 16 * 2**20

#: A CurveZMQ key in Z85 text: 32 bytes as 40 characters.
_Z85_KEY = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"
#: A container image reference (``[registry/]name[:tag][@digest]``): no spaces, no leading dash
#: (it must never read as an option), at most 255 characters as Docker allows.
IMAGE_REFERENCE = r"^[a-zA-Z0-9][a-zA-Z0-9._/:@+-]{0,254}$"
#: A host pool's name (``nbcluster host --pool``, a kernelspec's or a job's pool).
POOL_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"


def check_pool(value: object) -> str:
    """``value`` if it is a valid pool name, else ``ValueError`` saying why."""
    if not isinstance(value, str):
        raise ValueError(f"a pool name must be a string, not {type(value).__name__}")
    if not re.fullmatch(POOL_NAME[1:-1], value):
        raise ValueError(
            f"pool {value!r} is not a pool name (1 to 63 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit)"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuInfo(_Model):
    """One GPU a host offers: a real device found through NVML, or a virtual one from config."""

    index: int
    uuid: str
    name: str
    memory_mb: int
    virtual: bool


class HostResources(_Model):
    """What a host can give to replicas."""

    cpus: int
    memory_mb: int
    gpus: list[GpuInfo] = Field(default_factory=list)
    #: The host pool it is in (``nbcluster host --pool``); None: in none (older hosts too).
    pool: str | None = Field(default=None, pattern=POOL_NAME)


class ConnectionInfo(_Model):
    """Where a replica's five Jupyter sockets listen."""

    ip: str
    transport: Literal["tcp", "ipc"] = "tcp"
    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    #: The port the replica's Raft node listens on once it joins its group.
    raft_port: int | None = None
    #: The CurveZMQ server key of the five sockets (Z85); None: they are not encrypted. A
    #: client needs it to connect at all, so it is kept as secret as the kernel's HMAC key.
    curve_publickey: str | None = Field(default=None, pattern=_Z85_KEY, repr=False)


class ReplicaReport(_Model):
    """A running replica as its host reports it (in :class:`Hello` and after a start)."""

    kernel_id: str
    replica_id: str
    pid: int
    connection: ConnectionInfo


# host -> gateway ---------------------------------------------------------------------------


class Hello(_Model):
    """First frame a host sends: who it is, what it has, and which replicas it still runs."""

    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    address: str
    resources: HostResources
    replicas: list[ReplicaReport] = Field(default_factory=list)
    #: Ids of the batch jobs it still runs.
    jobs: list[str] = Field(default_factory=list)
    #: The attempt of each job it runs (``StartJob.attempt``): a run of an older attempt than
    #: the job's current one is stale, and the gateway tells the host to stop it.
    job_attempts: dict[str, int] = Field(default_factory=dict)


class Heartbeat(_Model):
    type: Literal["heartbeat"] = "heartbeat"
    replicas: int = 0


class Reply(_Model):
    """The answer to one gateway request: ``ok`` with a ``result``, or an ``error`` text."""

    type: Literal["reply"] = "reply"
    request_id: str
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: str = ""


class ReplicaExited(_Model):
    """A replica process ended (crash, kill, or a requested stop)."""

    type: Literal["replica_exited"] = "replica_exited"
    kernel_id: str
    replica_id: str
    exit_code: int | None
    requested: bool
    log_tail: str = ""


class JobOutput(_Model):
    """Output a running job wrote since the last one (stdout and stderr, interleaved).

    ``offset`` and ``end`` are the byte range of this attempt's output that ``data`` holds;
    the gateway answers with a :class:`JobOutputAck`, and the host sends again, after a
    reconnect, everything after the last acknowledged offset (the gateway skips what it
    already has)."""

    type: Literal["job_output"] = "job_output"
    job_id: str
    data: str
    #: The run this output belongs to (``StartJob.attempt``); 0: unknown (an older host).
    attempt: int = Field(0, ge=0)
    offset: int | None = Field(None, ge=0)
    end: int | None = Field(None, ge=0)


class JobExited(_Model):
    """A job's process (or container, or Kubernetes job) ended."""

    type: Literal["job_exited"] = "job_exited"
    job_id: str
    #: The run that ended (``StartJob.attempt``); 0: unknown (an older host).
    attempt: int = Field(0, ge=0)
    exit_code: int | None
    #: Why it ended other than by exiting (timed out, cancelled, could not start ...).
    error: str = ""
    log_tail: str = ""
    #: Object store keys of the outputs it produced, by name.
    outputs: dict[str, str] = Field(default_factory=dict)
    #: A fast job's result: its output.
    result: str | None = None


HostMessage = Annotated[
    Hello | Heartbeat | Reply | ReplicaExited | JobOutput | JobExited, Field(discriminator="type")
]

# gateway -> host ---------------------------------------------------------------------------


class Welcome(_Model):
    type: Literal["welcome"] = "welcome"
    heartbeat_interval: float


class JobOutputAck(_Model):
    """The gateway has the output of a job's attempt up to byte ``offset``: the host need
    never send it again."""

    type: Literal["job_output_ack"] = "job_output_ack"
    job_id: str
    attempt: int = Field(ge=0)
    offset: int = Field(ge=0)
    #: The gateway also has the run's end (``JobExited``): the host can forget the run.
    exited: bool = False


class StartReplica(_Model):
    """Start one replica process; answered with a :class:`ReplicaReport` as the result."""

    type: Literal["start_replica"] = "start_replica"
    request_id: str
    kernel_id: str
    replica_id: str
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    key: str
    signature_scheme: str = "hmac-sha256"
    working_dir: str | None = None
    launch_timeout: float = 30.0
    #: The CurveZMQ server secret key (Z85) the replica's sockets use; None: no encryption.
    #: The host writes it (and its public half) into the connection file, nowhere else.
    curve_secretkey: str | None = Field(default=None, pattern=_Z85_KEY, repr=False)
    #: The kernelspec's container image: the host runs the replica as a container of it (its
    #: ``--container-runtime``); None: a process, as the kernelspec's argv says.
    image: str | None = Field(default=None, pattern=IMAGE_REFERENCE)


class StopReplica(_Model):
    """Stop one replica: SIGTERM to its process group, SIGKILL after ``grace`` seconds."""

    type: Literal["stop_replica"] = "stop_replica"
    request_id: str
    replica_id: str
    grace: float = 5.0


class SignalReplica(_Model):
    """Send a signal (SIGINT for interrupt) to a replica's process group."""

    type: Literal["signal_replica"] = "signal_replica"
    request_id: str
    replica_id: str
    signum: int


class StartJob(_Model):
    """Run a batch job; answered once it started (result ``{"started": <unix time>}``)."""

    type: Literal["start_job"] = "start_job"
    request_id: str
    job_id: str
    #: The job's ``JobSpec`` (validated again by the host).
    spec: dict[str, Any]
    #: GPU devices bound to it (empty: none).
    gpus: list[int] = Field(default_factory=list)
    #: Where its inputs are and its outputs go.
    store_url: str | None = None
    #: Which run of the job this is (1, 2, ...): its events and outputs carry it, and the
    #: gateway drops those of a run that is no longer the job's current one.
    attempt: int = Field(0, ge=0)


class CancelJob(_Model):
    """Stop a running job (SIGTERM, then SIGKILL after ``grace`` seconds)."""

    type: Literal["cancel_job"] = "cancel_job"
    request_id: str
    job_id: str
    grace: float = 5.0
    #: Stop only this run of the job (None: whichever runs).
    attempt: int | None = None
    #: The run is no longer the job's (it was requeued and runs, or ran, elsewhere): stop it
    #: without collecting its outputs or reporting its end.
    stale: bool = False


GatewayRequest = StartReplica | StopReplica | SignalReplica | StartJob | CancelJob

GatewayMessage = Annotated[
    Welcome | JobOutputAck | StartReplica | StopReplica | SignalReplica | StartJob | CancelJob,
    Field(discriminator="type"),
]

HostEvent = Hello | Heartbeat | Reply | ReplicaExited | JobOutput | JobExited

_host_adapter: TypeAdapter[HostEvent] = TypeAdapter(HostMessage)
_gateway_adapter: TypeAdapter[Welcome | JobOutputAck | GatewayRequest] = TypeAdapter(GatewayMessage)


class HostProtocolError(ValueError):
    """A control frame could not be decoded; the text names the problem."""


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "frame"
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def decode_host_message(frame: str | bytes) -> HostEvent:
    """Parse a frame a host sent; raises :class:`HostProtocolError` naming what is wrong."""
    try:
        return _host_adapter.validate_json(frame)
    except ValidationError as exc:
        raise HostProtocolError(f"invalid host message: {_describe(exc)}") from None


def decode_gateway_message(frame: str | bytes) -> Welcome | JobOutputAck | GatewayRequest:
    """Parse a frame the gateway sent; raises :class:`HostProtocolError` naming what is wrong."""
    try:
        return _gateway_adapter.validate_json(frame)
    except ValidationError as exc:
        raise HostProtocolError(f"invalid gateway message: {_describe(exc)}") from None


def encode(message: BaseModel) -> str:
    return message.model_dump_json()
