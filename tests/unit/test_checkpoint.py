"""Rebuilding a kernel's state from a checkpoint and the store's log tail (pure)."""

from __future__ import annotations

import msgpack
import pytest
import xxhash

from nbcluster.kernel._checkpoint import (
    checkpoint_key,
    decode_checkpoint,
    encode_checkpoint,
    legacy_checkpoint_key,
    log_key,
    rebuild,
    term_of_key,
)
from nbcluster.kernel._records import Done, Proposal, encode_record
from nbcluster.kernel._sync import encode_payload


def _done(term: int, count: int, set_: dict[str, bytes], delete: tuple[str, ...] = ()) -> bytes:
    payload = {
        "count": count,
        "set": [
            {"slots": [n], "h": xxhash.xxh3_128_hexdigest(n.encode() + v), "v": v}
            for n, v in set_.items()
        ],
        "del": list(delete),
    }
    return encode_record(Done(term, "r1", "ok", count, encode_payload(payload)))


def _values(snapshot: bytes) -> dict[str, bytes]:
    state = msgpack.unpackb(snapshot, raw=False)["state"]
    return {slot: entry["v"] for entry in state["set"] for slot in entry["live"]}


def test_keys() -> None:
    assert checkpoint_key("k", 3) == "kernels/k/checkpoints/000000000003"
    assert legacy_checkpoint_key("k") == "kernels/k/checkpoint"
    assert log_key("k", 7) == "kernels/k/log/000000000007"
    assert term_of_key(log_key("k", 7)) == 7
    assert term_of_key(checkpoint_key("k", 3)) == 3
    assert term_of_key("kernels/k/log/junk") is None


def test_log_alone_rebuilds_in_term_order() -> None:
    entries = [_done(2, 2, {"b": b"2"}, delete=("a",)), _done(1, 1, {"a": b"1", "c": b"3"})]
    rebuilt = rebuild(None, entries, members=3)
    assert rebuilt is not None
    assert (rebuilt.term, rebuilt.execution_count, rebuilt.applied) == (2, 2, 2)
    assert rebuilt.checkpoint_created is None
    assert _values(rebuilt.snapshot) == {"b": b"2", "c": b"3"}


def test_checkpoint_then_later_entries_only() -> None:
    base = rebuild(None, [_done(1, 1, {"x": b"old"}), _done(2, 2, {"y": b"y"})], members=3)
    assert base is not None
    checkpoint = decode_checkpoint(encode_checkpoint(base.snapshot, 2, 2, "r2", created=1000.0))
    assert (checkpoint.term, checkpoint.created, checkpoint.replica) == (2, 1000.0, "r2")
    entries = [
        _done(1, 1, {"x": b"stale"}),  # covered by the checkpoint: ignored
        _done(3, 3, {"x": b"new"}),
        encode_record(Proposal("lead", 4, 1, "r1", "m")),  # not a Done: skipped
        b"\x00garbage",
    ]
    rebuilt = rebuild(checkpoint, entries, members=3)
    assert rebuilt is not None
    assert (rebuilt.term, rebuilt.applied, rebuilt.skipped) == (3, 1, 2)
    assert rebuilt.checkpoint_created == 1000.0
    assert _values(rebuilt.snapshot) == {"x": b"new", "y": b"y"}
    # The election restored from it ignores cells up to term 3.
    state = msgpack.unpackb(rebuilt.snapshot, raw=False)
    assert state["election"]["last_done_term"] == 3


def test_nothing_to_rebuild_from() -> None:
    assert rebuild(None, [], members=3) is None
    assert rebuild(None, [b"junk"], members=3) is None


@pytest.mark.parametrize("data", [b"", b"\x81\xa6format\x09", msgpack.packb({"format": 1})])
def test_bad_checkpoints_are_named(data: bytes) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        decode_checkpoint(data)
