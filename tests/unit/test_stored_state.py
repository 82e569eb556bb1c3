"""A kernel's state in the object store under signed state: two generations of checkpoints, and
what a restore does with a forged, altered or unsigned object (``kernel/_stored.py``)."""

from __future__ import annotations

import msgpack
import pytest
import xxhash

from nbcluster.kernel._checkpoint import (
    checkpoint_key,
    encode_checkpoint,
    legacy_checkpoint_key,
    log_key,
    rebuild,
)
from nbcluster.kernel._records import Done, encode_record
from nbcluster.kernel._seal import Refusals, derive_state_key, seal, store_context
from nbcluster.kernel._sealed import SealedStore
from nbcluster.kernel._stored import NoAuthenticState, read_state, write_checkpoint
from nbcluster.kernel._sync import encode_payload
from nbcluster.store import InMemoryStore, ObjectCorruptedError, StoreError

KEY = derive_state_key("k" * 64)
K = "kernel-1"


def _done(term: int, **values: bytes) -> bytes:
    entries = [
        {"slots": [n], "h": xxhash.xxh3_128_hexdigest(n.encode() + v), "v": v}
        for n, v in values.items()
    ]
    payload = {"count": term, "set": entries, "del": []}
    return encode_record(Done(term, "r1", "ok", term, encode_payload(payload)))


def _values(snapshot: bytes) -> dict[str, bytes]:
    state = msgpack.unpackb(snapshot, raw=False)["state"]
    return {slot: entry["v"] for entry in state["set"] for slot in entry["live"]}


class Kernel:
    """What an executor writes: a log entry per cell, a checkpoint now and then."""

    def __init__(self) -> None:
        self.inner = InMemoryStore()
        self.store = SealedStore(self.inner, KEY, Refusals())
        self.entries: list[bytes] = []

    def cell(self, term: int, **values: bytes) -> None:
        entry = _done(term, **values)
        self.entries.append(entry)
        self.store.put(log_key(K, term), entry)

    def checkpoint(self, term: int) -> None:
        rebuilt = rebuild(None, self.entries, members=3)
        assert rebuilt is not None and rebuilt.term == term
        data = encode_checkpoint(rebuilt.snapshot, term, term, "r1", created=float(term))
        write_checkpoint(self.store, K, term, data)

    def restore(self) -> tuple[dict[str, bytes], int, dict[str, str]]:
        stored = read_state(self.store, K)
        rebuilt = rebuild(stored.checkpoint, stored.entries, members=3)
        assert rebuilt is not None
        return _values(rebuilt.snapshot), rebuilt.term, stored.refused

    def keys(self, prefix: str) -> list[str]:
        return [i.key for i in self.inner.list(f"kernels/{K}/{prefix}")]


def _history() -> Kernel:
    """Cells 1..7, checkpoints after cells 2, 4 and 6."""
    kernel = Kernel()
    for term in range(1, 8):
        kernel.cell(term, **{f"v{term}": str(term).encode()})
        if term in (2, 4, 6):
            kernel.checkpoint(term)
    return kernel


EVERYTHING = {f"v{t}": str(t).encode() for t in range(1, 8)}


def test_two_checkpoints_are_kept_and_the_log_after_the_older_one() -> None:
    kernel = _history()
    assert kernel.keys("checkpoints/") == [checkpoint_key(K, 4), checkpoint_key(K, 6)]
    assert kernel.keys("log/") == [log_key(K, t) for t in (5, 6, 7)]
    assert kernel.restore() == (EVERYTHING, 7, {})


def test_a_forged_newest_checkpoint_falls_back_to_the_older_one_and_loses_nothing() -> None:
    kernel = _history()
    kernel.inner.put(checkpoint_key(K, 6), b"forged, unsigned")
    values, term, refused = kernel.restore()
    assert (values, term) == (EVERYTHING, 7)
    assert list(refused) == [checkpoint_key(K, 6)] and "not sealed" in refused[checkpoint_key(K, 6)]
    assert kernel.store.refusals.count == 1


def test_an_altered_checkpoint_is_refused_and_one_copied_from_another_term_too() -> None:
    kernel = _history()
    altered = bytearray(kernel.inner.get(checkpoint_key(K, 6)))
    altered[-1] ^= 1
    kernel.inner.put(checkpoint_key(K, 6), bytes(altered))
    # An authentic checkpoint under a later term's name: would drop cells 5..7.
    kernel.inner.put(checkpoint_key(K, 9), kernel.inner.get(checkpoint_key(K, 4)))
    values, term, refused = kernel.restore()
    assert (values, term) == (EVERYTHING, 7)
    assert set(refused) == {checkpoint_key(K, 6), checkpoint_key(K, 9)}
    # The next checkpoint keeps as its fallback the newest earlier one that opens (4, not the
    # altered 6), and neither refused one.
    kernel.cell(8, v8=b"8")
    kernel.checkpoint(8)
    assert kernel.keys("checkpoints/") == [checkpoint_key(K, 4), checkpoint_key(K, 8)]
    assert kernel.keys("log/") == [log_key(K, t) for t in (5, 6, 7, 8)]
    kernel.inner.put(checkpoint_key(K, 8), b"forged")
    assert kernel.restore()[:2] == ({**EVERYTHING, "v8": b"8"}, 8)


def test_forged_log_entries_are_left_out_and_the_authentic_ones_applied() -> None:
    kernel = _history()
    forged = _done(8, v1=b"hijacked")  # would overwrite v1 and move the count to 8
    kernel.inner.put(log_key(K, 8), forged)  # unsigned
    kernel.inner.put(
        log_key(K, 9), seal(derive_state_key("x"), store_context(log_key(K, 9)), forged)
    )
    # Cell 7's entry replaced by cell 5's (authentic, under another name): refused, and only
    # cell 7's change is missing.
    kernel.inner.put(log_key(K, 7), kernel.inner.get(log_key(K, 5)))
    values, term, refused = kernel.restore()
    assert term == 6 and values == {k: v for k, v in EVERYTHING.items() if k != "v7"}
    assert set(refused) == {log_key(K, 7), log_key(K, 8), log_key(K, 9)}


def test_no_authentic_checkpoint_restores_nothing() -> None:
    kernel = _history()
    for term in (4, 6):
        kernel.inner.put(checkpoint_key(K, term), b"garbage")
    with pytest.raises(NoAuthenticState, match="no checkpoint of this kernel") as caught:
        read_state(kernel.store, K)
    assert checkpoint_key(K, 4) in str(caught.value) and checkpoint_key(K, 6) in str(caught.value)


def test_an_unsigned_checkpoint_from_before_signed_state_is_refused_with_a_message() -> None:
    kernel = Kernel()
    kernel.inner.put(legacy_checkpoint_key(K), msgpack.packb({"format": 2}))
    kernel.inner.put(log_key(K, 3), _done(3, a=b"1"))
    with pytest.raises(NoAuthenticState, match="written before nbcluster signed its state"):
        read_state(kernel.store, K)
    # Once a signed checkpoint exists, the old one is ignored, and deleted by the next.
    kernel.cell(4, b=b"2")
    kernel.checkpoint(4)
    assert kernel.keys("checkpoint") == [checkpoint_key(K, 4)]


def test_nothing_stored_is_nothing_to_restore() -> None:
    stored = read_state(Kernel().store, K)
    assert stored.checkpoint is None and stored.entries == [] and stored.refused == {}


class _Failing(InMemoryStore):
    """Fails reads of one key with ``error``."""

    def __init__(self, key: str, error: Exception) -> None:
        super().__init__()
        self.failing, self.error = key, error

    def get(self, key: str) -> bytes:
        if key == self.failing:
            raise self.error
        return super().get(key)


def test_a_damaged_checkpoint_is_passed_over_and_an_unreachable_store_fails_the_restore() -> None:
    source = _history()
    for error, falls_back in (
        (ObjectCorruptedError(checkpoint_key(K, 6), "checksum mismatch"), True),
        (StoreError("connection refused"), False),
    ):
        inner = _Failing(checkpoint_key(K, 6), error)
        for key in [i.key for i in source.inner.list()]:
            inner.put(key, source.inner.get(key))
        store = SealedStore(inner, KEY, Refusals())
        if falls_back:
            stored = read_state(store, K)
            assert stored.checkpoint is not None and stored.checkpoint.term == 4
            assert "checksum mismatch" in stored.refused[checkpoint_key(K, 6)]
            assert store.refusals.count == 0  # damaged, not forged
        else:
            with pytest.raises(StoreError, match="connection refused"):
                read_state(store, K)
