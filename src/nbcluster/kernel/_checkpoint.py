"""Checkpoints of a kernel's synchronised state in the object store, and rebuilding that state
from the last checkpoint plus the log tail, as pure functions (no I/O: ``_stored`` reads and
writes the store).

Layout, per kernel ``K`` (next to its large values, ``kernels/K/values/...``); every object is
sealed with the kernel's state key, bound to its key (``_seal``):

* ``kernels/K/log/<term, 12 digits>``: the committed ``Done`` record of each cell (its state
  change, large values as pointers), written by the executor after the commit;
* ``kernels/K/checkpoints/<term, 12 digits>``: the merged state up to that term (the same
  bytes a Raft snapshot holds), written every few cells and on demand. The newest two are
  kept, and the log entries up to the older one's term are removed: if the newest is refused
  (forged, altered, damaged), the older one and the log entries after it rebuild the same
  state.
* ``kernels/K/checkpoint``: where nbcluster kept its one checkpoint before it signed its
  state. Such a checkpoint is unsigned: it is refused, with a message that says so.

A kernel that lost every replica is rebuilt from a checkpoint and the log entries after it
(:func:`rebuild`), by each new replica alike, so they start identical.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from ._election import ElectionLog
from ._payload import MergedState, decode_payload
from ._records import Done, RecordError, decode_record

__all__ = [
    "Checkpoint",
    "Rebuilt",
    "checkpoint_key",
    "checkpoint_prefix",
    "decode_checkpoint",
    "encode_checkpoint",
    "legacy_checkpoint_key",
    "log_key",
    "log_prefix",
    "rebuild",
    "term_of_key",
]

#: 2: the state is a ``MergedState`` of components (identity-preserving synchronisation).
_FORMAT = 2


def checkpoint_prefix(kernel_id: str) -> str:
    return f"kernels/{kernel_id}/checkpoints/"


def checkpoint_key(kernel_id: str, term: int) -> str:
    return f"{checkpoint_prefix(kernel_id)}{term:012d}"


def legacy_checkpoint_key(kernel_id: str) -> str:
    """The one, unsigned, checkpoint of an nbcluster from before signed state."""
    return f"kernels/{kernel_id}/checkpoint"


def log_prefix(kernel_id: str) -> str:
    return f"kernels/{kernel_id}/log/"


def log_key(kernel_id: str, term: int) -> str:
    return f"{log_prefix(kernel_id)}{term:012d}"


def term_of_key(key: str) -> int | None:
    """The term a log entry's or a checkpoint's key names (None: not such a key)."""
    tail = key.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What ``kernels/K/checkpoint`` holds."""

    term: int
    execution_count: int
    created: float
    replica: str
    #: The coordinator's snapshot (election state and merged values), msgpack.
    snapshot: bytes


def encode_checkpoint(
    snapshot: bytes, term: int, execution_count: int, replica: str, created: float | None = None
) -> bytes:
    data: bytes = msgpack.packb(
        {
            "format": _FORMAT,
            "term": term,
            "count": execution_count,
            "created": time.time() if created is None else created,
            "replica": replica,
            "snapshot": snapshot,
        },
        use_bin_type=True,
    )
    return data


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Raises ``ValueError`` naming what is wrong with a stored checkpoint."""
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ValueError(f"checkpoint is not msgpack: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ValueError(
            f"checkpoint has format {found!r}; this nbcluster reads format {_FORMAT} "
            "(a checkpoint written by an older nbcluster cannot be restored)"
        )
    try:
        checkpoint = Checkpoint(
            int(raw["term"]),
            int(raw["count"]),
            float(raw["created"]),
            str(raw["replica"]),
            bytes(raw["snapshot"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint is missing or has a bad field: {exc}") from None
    return checkpoint


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The state :func:`rebuild` produced."""

    #: A coordinator snapshot (``ReplicaCoordinator.restore`` takes it).
    snapshot: bytes
    term: int
    execution_count: int
    #: When the checkpoint was written (None: rebuilt from log entries alone).
    checkpoint_created: float | None
    #: Log entries applied after the checkpoint, and entries skipped as unreadable.
    applied: int
    skipped: int
    #: Stored objects not used because they were refused (forged, altered, unsigned) or
    #: damaged: their keys (the reasons are in the replica's log).
    refused: tuple[str, ...] = ()


def rebuild(
    checkpoint: Checkpoint | None, log_entries: Iterable[bytes], members: int
) -> Rebuilt | None:
    """The merged state of ``checkpoint`` then every ``Done`` in ``log_entries`` with a later
    term, in term order. None when there is nothing to rebuild from."""
    state = MergedState()
    election = ElectionLog(members)
    if checkpoint is not None:
        stored = msgpack.unpackb(checkpoint.snapshot, raw=False)
        election = ElectionLog.restore(stored["election"])
        election.members = members
        state = MergedState.from_primitive(stored["state"])
        # A checkpoint snapshot may predate its own term's bookkeeping: trust the header.
        election.last_done_term = max(election.last_done_term, checkpoint.term)
        election.last_done_count = checkpoint.execution_count
    dones: list[Done] = []
    skipped = 0
    for data in log_entries:
        try:
            record = decode_record(data)
        except RecordError:
            skipped += 1
            continue
        if isinstance(record, Done):
            dones.append(record)
        else:
            skipped += 1
    applied = 0
    for done in sorted(dones, key=lambda d: d.term):
        if done.term <= election.last_done_term:
            continue
        if done.sync:
            try:
                state.merge(decode_payload(done.sync))
            except ValueError:
                skipped += 1
                continue
        election.last_done_term = done.term
        election.last_done_count = done.execution_count
        applied += 1
    if checkpoint is None and applied == 0:
        return None
    snapshot: bytes = msgpack.packb(
        {"election": election.snapshot(), "state": state.to_primitive()}, use_bin_type=True
    )
    return Rebuilt(
        snapshot,
        election.last_done_term,
        election.last_done_count,
        checkpoint.created if checkpoint is not None else None,
        applied,
        skipped,
    )
