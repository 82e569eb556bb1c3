"""What the gateway persists so that a restarted gateway re-attaches to running kernels.

Records are small and change only on kernel lifecycle events (create, restart, replica death,
shutdown), so each kernel is one JSON file written atomically (temp file + rename), readable
only by its owner because it holds the kernel's HMAC key.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field, ValidationError

from ..hostproto import ConnectionInfo

__all__ = [
    "FaceRecord",
    "FileStateStore",
    "KernelRecord",
    "MemoryStateStore",
    "ReplicaRecord",
    "StateStore",
]

log = logging.getLogger(__name__)

ReplicaState = Literal["starting", "running", "unknown", "dead", "stopped"]


class ReplicaRecord(BaseModel):
    replica_id: str
    host: str
    state: ReplicaState = "starting"
    pid: int | None = None
    connection: ConnectionInfo | None = None
    reason: str = ""


class FaceRecord(BaseModel):
    """A kernel's ZMQ face (``_faces``), so that a restarted gateway binds it again on the same
    ports with the same keys and the face's clients (a Jupyter server's provisioner, a
    ``jupyter console``) reconnect without a new connection file. The secrets sit beside the
    kernel's own key, in the same owner-only record."""

    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    key: str
    #: Z85 CurveZMQ server secret key; None: the face was opened without encryption.
    curve_secret: str | None = None

    def ports_of(self) -> dict[str, int]:
        """Channel name → port, as ``ZmqFace.open`` takes them."""
        return {
            "shell": self.shell_port,
            "iopub": self.iopub_port,
            "stdin": self.stdin_port,
            "control": self.control_port,
            "hb": self.hb_port,
        }


class KernelRecord(BaseModel):
    id: str
    name: str
    key: str
    #: The user who started it (records from before users existed: the admin's).
    owner: str = ""
    raft_password: str = ""
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    replicas: list[ReplicaRecord] = Field(default_factory=list)
    dead_reason: str = ""
    #: Scheduling: the policy, the resource request (``Resources`` fields), how many replicas
    #: the kernel runs, and the GPU devices it holds for life (``reservation``).
    policy: str = "notebookos"
    request: dict[str, float] = Field(default_factory=dict)
    replica_count: int = 1
    reserved_devices: list[int] | None = None
    #: The host pool its replicas run in (its kernelspec's, at start); None: any host.
    pool: str | None = None
    #: The only hosts its replicas run on (its kernelspec's ``remote_hosts``, as the ssh
    #: provider names their daemons, at start); None: any host.
    hosts: list[str] | None = None
    #: Seconds a start of its replicas may take (its kernelspec's ``launch_timeout``, at
    #: start); None: the gateway's ``--launch-timeout``.
    launch_timeout: float | None = None

    @property
    def confined_hosts(self) -> frozenset[str] | None:
        """``hosts`` as the scheduler takes it (``KernelRequested.hosts``)."""
        return None if self.hosts is None else frozenset(self.hosts)

    #: Idle reclamation released every replica (state in the store); the next message wakes it.
    reclaimed: bool = False
    #: Its ZMQ face, while it has one.
    face: FaceRecord | None = None


class StateStore(Protocol):
    """Where kernel records live. The gateway calls :meth:`save` after every lifecycle change,
    :meth:`delete` on shutdown and :meth:`load_all` once at start-up."""

    def load_all(self) -> list[KernelRecord]: ...

    def save(self, record: KernelRecord) -> None: ...

    def delete(self, kernel_id: str) -> None: ...


class MemoryStateStore:
    """Keeps records in a dict: for unit tests, and for a gateway that need not survive."""

    def __init__(self) -> None:
        self.records: dict[str, KernelRecord] = {}

    def load_all(self) -> list[KernelRecord]:
        return [r.model_copy(deep=True) for r in self.records.values()]

    def save(self, record: KernelRecord) -> None:
        self.records[record.id] = record.model_copy(deep=True)

    def delete(self, kernel_id: str) -> None:
        self.records.pop(kernel_id, None)


class FileStateStore:
    """One ``kernels/<id>.json`` file per kernel under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir / "kernels"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, kernel_id: str) -> Path:
        return self._dir / f"{kernel_id}.json"

    def load_all(self) -> list[KernelRecord]:
        records = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                records.append(KernelRecord.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError) as exc:
                log.error("ignoring unreadable kernel record %s: %s", path, exc)
        return records

    def save(self, record: KernelRecord) -> None:
        path = self._path(record.id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(record.model_dump_json(indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, kernel_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kernel_id).unlink()
