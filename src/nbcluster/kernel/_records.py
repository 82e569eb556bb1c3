"""Records of a kernel's replicated log, and their encoding (msgpack maps of primitives).

* ``lead`` / ``yield``: a replica's proposal for one execution: it was asked to execute
  (lead) or to stand by (yield) for ``term`` (the gateway's execution index) and ``attempt``;
  a lead lists the globals the cell binds (``binds``), so that the other replicas can name
  them if the cell's state is lost with its executor.
* ``done``: the executor finished ``term``; carries the cell's state update (see ``_sync``).
* ``mark``: a no-op a replica appends to learn that it has applied everything before it
  (a replica joining its group does this before it may execute).

Decoding validates every field, so that a malformed record from a buggy or hostile peer is
rejected with a message naming the problem instead of crashing the replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgpack

__all__ = ["Done", "Mark", "Proposal", "Record", "RecordError", "decode_record", "encode_record"]


#: At most this many bound names travel with a lead (the message to the user stays short).
_MAX_BINDS = 64


class RecordError(ValueError):
    """A log record could not be decoded; the text names what is wrong."""


@dataclass(frozen=True, slots=True)
class Proposal:
    kind: Literal["lead", "yield"]
    term: int
    attempt: int
    replica: str
    msg_id: str
    #: The globals the cell binds (a lead's): named to the user if its state is lost.
    binds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    term: int
    replica: str
    status: str
    execution_count: int
    sync: bytes | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    replica: str
    nonce: str


Record = Proposal | Done | Mark


def encode_record(record: Record) -> bytes:
    if isinstance(record, Mark):
        data: dict[str, Any] = {"k": "mark", "replica": record.replica, "nonce": record.nonce}
    elif isinstance(record, Proposal):
        data = {
            "k": record.kind,
            "term": record.term,
            "attempt": record.attempt,
            "replica": record.replica,
            "msg": record.msg_id,
        }
        if record.binds:
            data["binds"] = list(record.binds)
    else:
        data = {
            "k": "done",
            "term": record.term,
            "replica": record.replica,
            "status": record.status,
            "count": record.execution_count,
            "sync": record.sync,
        }
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(
            f"record field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def decode_record(raw: bytes) -> Record:
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(f"record is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError(f"record must be a map, got {type(data).__name__}")
    kind = data.get("k")
    if kind in ("lead", "yield"):
        term = _field(data, "term", int)
        attempt = _field(data, "attempt", int)
        if term < 1 or attempt < 1:
            raise RecordError("record term and attempt must be >= 1")
        binds = data.get("binds", [])
        if not isinstance(binds, list) or not all(isinstance(b, str) for b in binds):
            raise RecordError("record field 'binds' must be a list of str")
        return Proposal(
            kind,
            term,
            attempt,
            _field(data, "replica", str),
            _field(data, "msg", str),
            tuple(binds[:_MAX_BINDS]),
        )
    if kind == "mark":
        return Mark(_field(data, "replica", str), _field(data, "nonce", str))
    if kind == "done":
        sync = data.get("sync")
        if sync is not None and not isinstance(sync, bytes):
            raise RecordError("record field 'sync' must be bytes or nil")
        return Done(
            _field(data, "term", int),
            _field(data, "replica", str),
            _field(data, "status", str),
            _field(data, "count", int),
            sync,
        )
    raise RecordError(f"unknown record kind {kind!r}")
