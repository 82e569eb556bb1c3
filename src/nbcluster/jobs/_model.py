"""Batch jobs: what a submitter asks for (:class:`JobSpec`) and what the platform keeps about
each job (:class:`Job`). Pydantic models, validated at the API with errors naming the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..hostproto import check_pool

__all__ = [
    "FAST_INPUT_LIMIT",
    "TERMINAL",
    "Job",
    "JobLimits",
    "JobResources",
    "JobSpec",
    "JobStatus",
    "QueueName",
    "RuntimeName",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
QueueName = Literal["cpu", "gpu"]
RuntimeName = Literal["process", "docker", "kubernetes", "tfjob", "pytorchjob"]

#: Inline inputs of a fast job, in bytes at most (they travel in the request).
FAST_INPUT_LIMIT = 1 * 2**20

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobLimits:
    """Size caps on a submitted job spec (bytes, UTF-8), checked at the API: the gateway
    validates ``POST /api/jobs`` with ``JobSpec.model_validate(data, context={"job_limits":
    limits})``. Without that context (a stored job read back) no cap is checked, so raising
    or lowering a cap never makes stored jobs unreadable."""

    #: ``source``.
    source_bytes: int = 4 * 2**20
    #: ``command``, all arguments together.
    command_bytes: int = 1 * 2**20
    #: One ``env`` value.
    env_value_bytes: int = 64 * 2**10
    #: All of ``env``, names and values.
    env_bytes: int = 512 * 2**10
    #: Entries of ``inputs``, ``inline_inputs`` and ``outputs`` together.
    inputs: int = 1024
    #: One name or store key in ``inputs`` / ``outputs``.
    name_bytes: int = 1024
    #: All of ``inline_inputs``.
    inline_bytes: int = FAST_INPUT_LIMIT


def _over(what: str, size: int, limit: int, unit: str = "bytes") -> ValueError:
    return ValueError(f"{what}: {size} {unit} is over the limit of {limit} {unit}")


def check_job_limits(spec: JobSpec, limits: JobLimits) -> None:
    """Raise ``ValueError`` naming the first part of ``spec`` over its cap in ``limits``."""
    if spec.source is not None and (n := len(spec.source.encode())) > limits.source_bytes:
        raise _over("source", n, limits.source_bytes)
    if spec.command is not None:
        n = sum(len(a.encode()) for a in spec.command)
        if n > limits.command_bytes:
            raise _over("command", n, limits.command_bytes)
    total = 0
    for name, value in spec.env.items():
        n = len(value.encode())
        if n > limits.env_value_bytes:
            raise _over(f"env.{name}", n, limits.env_value_bytes)
        total += n + len(name.encode())
    if total > limits.env_bytes:
        raise _over("env (all variables)", total, limits.env_bytes)
    entries = len(spec.inputs) + len(spec.inline_inputs) + len(spec.outputs)
    if entries > limits.inputs:
        raise _over("inputs, inline_inputs and outputs", entries, limits.inputs, "entries")
    for where, names in (
        ("inputs", [*spec.inputs, *spec.inputs.values()]),
        ("inline_inputs", list(spec.inline_inputs)),
        ("outputs", spec.outputs),
    ):
        for name in names:
            if (n := len(name.encode())) > limits.name_bytes:
                raise _over(f"{where}: {name[:40]!r}...", n, limits.name_bytes)
    inline = sum(len(v.encode()) for v in spec.inline_inputs.values())
    if inline > limits.inline_bytes:
        raise _over("inline_inputs", inline, limits.inline_bytes)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobResources(_Model):
    """What one worker of the job needs."""

    gpus: int = Field(0, ge=0, le=1024)
    cpus: float = Field(1.0, gt=0, le=4096)
    memory_mb: int = Field(1024, gt=0)


class JobSpec(_Model):
    """``POST /api/jobs``: a command (argv list) or a Python source, where and with what."""

    name: str = Field("", max_length=200)
    command: list[str] | None = Field(
        None, description='argv of the process, e.g. ["python", "train.py"]; no shell'
    )
    source: str | None = Field(None, description="Python source to run (instead of command)")
    image: str | None = Field(None, description="container image (docker, kubernetes, tfjob)")
    runtime: RuntimeName = "process"
    queue: QueueName | None = Field(None, description="default: gpu if resources.gpus > 0")
    env: dict[str, str] = Field(default_factory=dict)
    #: name -> object store key (standard jobs) or inline text (fast jobs, ``inline_inputs``).
    inputs: dict[str, str] = Field(default_factory=dict)
    inline_inputs: dict[str, str] = Field(default_factory=dict)
    #: Files (relative to the job's directory) collected into the store when it ends.
    outputs: list[str] = Field(default_factory=list)
    resources: JobResources = Field(default_factory=lambda: JobResources.model_validate({}))
    #: Distributed training (tfjob, pytorchjob): number of workers.
    workers: int = Field(1, ge=1, le=1024)
    timeout: float = Field(3600.0, gt=0, le=7 * 24 * 3600)
    retries: int = Field(0, ge=0, le=100)
    fast: bool = False
    #: The user it belongs to: set by the gateway from the caller's identity (what a client
    #: sends is replaced; an admin may submit for another user by naming them).
    owner: str = Field("", max_length=200)
    #: The kernel whose %%job magic submitted it (set by the gateway from the kernel's token).
    kernel_id: str = Field("", max_length=200)
    #: The host pool it runs in (``nbcluster host --pool``); None: any host.
    pool: str | None = Field(None, description="host pool to run in (default: any host)")

    @field_validator("command", mode="before")
    @classmethod
    def _command_is_argv(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings (an argv; no shell is used)")
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, v in value.items():
            if (
                not name
                or not (name[0].isalpha() or name[0] == "_")
                or not all(c.isalnum() or c == "_" for c in name)
            ):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if "\x00" in v:
                raise ValueError(f"{name}: contains a NUL character")
        return value

    @field_validator("pool", mode="before")
    @classmethod
    def _pool_name(cls, value: Any) -> Any:
        return None if value is None else check_pool(value)

    @field_validator("inputs", "inline_inputs", "outputs")
    @classmethod
    def _safe_names(cls, value: Any) -> Any:
        names = value if isinstance(value, list) else list(value)
        for name in names:
            parts = name.split("/")
            if not name or name.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(f"{name!r} must be a relative path inside the job's directory")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if (self.command is None) == (self.source is None):
            raise ValueError("give exactly one of command (an argv list) or source (Python)")
        if self.runtime != "process" and not self.image:
            raise ValueError(f"image: required by the {self.runtime} runtime")
        if self.queue == "cpu" and self.resources.gpus > 0:
            raise ValueError("queue: the cpu queue takes no GPU jobs (resources.gpus > 0)")
        if self.fast:
            size = sum(len(v.encode()) for v in self.inline_inputs.values())
            if size > FAST_INPUT_LIMIT:
                raise ValueError(
                    f"inline_inputs: {size} bytes is over the fast-job limit of "
                    f"{FAST_INPUT_LIMIT} bytes; submit a standard job with store inputs"
                )
            if self.inputs:
                raise ValueError("inputs: fast jobs take inline_inputs only (not store keys)")
        if self.workers > 1 and self.runtime not in ("tfjob", "pytorchjob"):
            raise ValueError("workers: more than 1 needs the tfjob or pytorchjob runtime")
        return self

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> JobSpec:
        limits = info.context.get("job_limits") if isinstance(info.context, dict) else None
        if isinstance(limits, JobLimits):
            check_job_limits(self, limits)
        return self

    @property
    def queue_name(self) -> QueueName:
        if self.queue is not None:
            return self.queue
        return "gpu" if self.resources.gpus > 0 else "cpu"


class Job(_Model):
    """A job as the gateway keeps it (durable for standard jobs)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    spec: JobSpec
    status: JobStatus = "queued"
    #: How many times it was started (1 + requeues after a worker died or a failure retried).
    #: It is also the current run's attempt number: events and outputs of any other run are
    #: dropped (fencing).
    attempts: int = 0
    #: Size of its stored log when the current attempt started (that attempt's output
    #: follows it).
    log_base: int = 0
    worker: str | None = None
    exit_code: int | None = None
    error: str = ""
    #: The end of its output (for failed jobs and quick looks).
    log_tail: str = ""
    #: Object store keys of collected outputs, by name.
    output_keys: dict[str, str] = Field(default_factory=dict)
    #: A fast job's result: its standard output (and outputs inline).
    result: str | None = None
    created: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL
