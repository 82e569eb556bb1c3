"""Signed state: sealing and opening (any change refused before decoding), the per-kernel key,
and the two doors a replica's state comes through (the object store, the Raft log)."""

from __future__ import annotations

import asyncio
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.consensus import InMemoryLogGroup
from nbcluster.kernel._records import Done, Proposal, encode_record
from nbcluster.kernel._replication import ReplicaCoordinator
from nbcluster.kernel._seal import (
    HEADER_SIZE,
    MAGIC,
    RAFT_RECORD,
    STATE_KEY_LABEL,
    ForgedState,
    Refusals,
    derive_state_key,
    open_sealed,
    seal,
    store_context,
)
from nbcluster.kernel._sealed import SealedLog, SealedLogState, SealedStore
from nbcluster.kernel._sync import StateSynchronizer, encode_payload
from nbcluster.store import InMemoryStore

from .strategies import fast

KEY = derive_state_key(b"0123456789abcdef" * 4)
OTHER_KEY = derive_state_key(b"another kernel's jupyter key")

_keys = st.binary(min_size=1, max_size=64)
_contexts = st.text(max_size=80)
_data = st.binary(max_size=2048)


class Marker:
    """Unpickling this writes a file: proof that a forged pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.path, "forged code ran"))


# -- the seal --------------------------------------------------------------------------------


@fast
@given(key=_keys, context=_contexts, data=_data)
def test_what_is_sealed_opens_to_the_same_bytes(key: bytes, context: str, data: bytes) -> None:
    sealed = seal(key, context, data)
    assert len(sealed) == len(data) + HEADER_SIZE and sealed.startswith(MAGIC)
    assert open_sealed(key, context, sealed) == data


@fast
@given(data=st.binary(min_size=1, max_size=256), where=st.integers(0), flip=st.integers(1, 255))
def test_changing_any_byte_is_refused(data: bytes, where: int, flip: int) -> None:
    sealed = bytearray(seal(KEY, "store:kernels/k/log/000000000001", data))
    where %= len(sealed)
    sealed[where] ^= flip
    with pytest.raises(ForgedState, match="refused"):
        open_sealed(KEY, "store:kernels/k/log/000000000001", bytes(sealed))


@fast
@given(data=_data, cut=st.integers(1))
def test_truncated_or_extended_objects_are_refused(data: bytes, cut: int) -> None:
    sealed = seal(KEY, "c", data)
    cut = 1 + (cut - 1) % len(sealed)
    with pytest.raises(ForgedState):
        open_sealed(KEY, "c", sealed[:-cut])
    with pytest.raises(ForgedState):
        open_sealed(KEY, "c", sealed + b"\x00")


@fast
@given(data=_data, context=_contexts, other=_contexts)
def test_an_object_sealed_for_one_name_does_not_open_as_another(
    data: bytes, context: str, other: str
) -> None:
    sealed = seal(KEY, context, data)
    if other != context:
        with pytest.raises(ForgedState, match="tag does not match"):
            open_sealed(KEY, other, sealed)
    with pytest.raises(ForgedState, match="another kernel"):
        open_sealed(OTHER_KEY, context, sealed)


def test_the_context_is_length_prefixed_so_no_split_is_ambiguous() -> None:
    # Without the length, ("ab", "c...") and ("a", "bc...") would be tagged alike.
    sealed = seal(KEY, "ab", b"cdata")
    with pytest.raises(ForgedState):
        open_sealed(KEY, "a", b"".join((MAGIC, sealed[len(MAGIC) : HEADER_SIZE], b"bcdata")))


@pytest.mark.parametrize("raw", [b"", b"short", pickle.dumps({"a": 1}), b"\x80" * 100])
def test_unsealed_bytes_are_refused_as_unsigned(raw: bytes) -> None:
    with pytest.raises(ForgedState, match="not sealed") as caught:
        open_sealed(KEY, "store:kernels/k/checkpoint", raw, name="kernels/k/checkpoint")
    assert caught.value.name == "kernels/k/checkpoint"


def test_the_state_key_is_its_own_and_needs_a_kernel_key() -> None:
    jupyter_key = "f" * 64
    derived = derive_state_key(jupyter_key)
    assert derived == derive_state_key(jupyter_key.encode())  # str or bytes, as ipykernel has it
    assert len(derived) == 32 and derived != jupyter_key.encode()[:32]
    assert STATE_KEY_LABEL == b"nbcluster state v1"
    assert derive_state_key("g" * 64) != derived
    with pytest.raises(ValueError, match="no per-kernel key"):
        derive_state_key(b"")


def test_refusals_are_counted_named_and_logged_without_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = Refusals(keep=2)
    before = refusals.mark()
    with caplog.at_level(logging.ERROR):
        for name in ("a", "b", "c"):
            refusals.note(ForgedState(name, "why"))
    assert refusals.count == 3
    assert refusals.since(before) == ["b", "c"]  # the most recent ones are kept
    assert refusals.since(refusals.mark()) == []
    assert "forged or altered state: refused c: why" in caplog.text


# -- the object store -------------------------------------------------------------------------


def test_the_sealed_store_binds_each_object_to_its_key() -> None:
    inner = InMemoryStore()
    store = SealedStore(inner, KEY, Refusals())
    store.put("kernels/k/log/000000000001", b"one")
    store.put("kernels/k/log/000000000002", b"two")
    assert store.get("kernels/k/log/000000000001") == b"one"
    assert inner.get("kernels/k/log/000000000001") != b"one"  # what the store holds is sealed
    # An authentic object moved under another name is refused (and counted).
    inner.put("kernels/k/log/000000000002", inner.get("kernels/k/log/000000000001"))
    with pytest.raises(ForgedState, match="kernels/k/log/000000000002"):
        store.get("kernels/k/log/000000000002")
    # A forgery sealed with another kernel's key is refused too.
    inner.put("kernels/k/values/x", seal(OTHER_KEY, store_context("kernels/k/values/x"), b"v"))
    with pytest.raises(ForgedState):
        store.get("kernels/k/values/x")
    assert store.refusals.count == 2
    assert [i.key for i in store.list("kernels/k/log/")] == [
        "kernels/k/log/000000000001",
        "kernels/k/log/000000000002",
    ]
    store.delete("kernels/k/log/000000000001")
    assert [i.key for i in inner.list("kernels/k/log/")] == ["kernels/k/log/000000000002"]


def test_a_forged_large_value_is_refused_before_it_is_unpickled(tmp_path: Path) -> None:
    inner = InMemoryStore()
    refusals = Refusals()
    executor = StateSynchronizer({}, set(), SealedStore(inner, KEY, refusals), threshold=10)
    follower_ns: dict[str, Any] = {"kept": 1}
    follower = StateSynchronizer(follower_ns, set(), SealedStore(inner, KEY, refusals))
    executor.namespace["big"] = list(range(100))
    payload = executor.capture(1, "big = list(range(100))").payload
    assert payload is not None
    (entry,) = payload["set"]
    assert "ptr" in entry
    # Someone with write access to the store replaces the value with a pickle that runs code
    # (and even gives it the digest the record announces).
    marker = tmp_path / "marker"
    inner.put(entry["ptr"], pickle.dumps((("big",), (Marker(marker),))))
    result = follower.apply(payload)
    assert not marker.exists()
    assert "big" in result.failed and "refused" in result.failed["big"]
    assert "big" not in follower_ns and follower_ns["kept"] == 1
    assert refusals.count == 1


# -- the Raft log -----------------------------------------------------------------------------


class _Replica:
    def __init__(self, replica_id: str, loop: asyncio.AbstractEventLoop, key: bytes) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__"}
        self.sync = StateSynchronizer(self.ns, set(), InMemoryStore())
        self.coordinator = ReplicaCoordinator(replica_id, 3, loop, self._on_state)
        self.sealed = SealedLogState(self.coordinator, key, Refusals())

    def _on_state(self, payload: Any, count: int) -> None:
        if payload is not None:
            self.sync.apply(payload)


async def _propose_cell(replica: _Replica, log: SealedLog, term: int, code: str) -> None:
    await log.propose(encode_record(Proposal("lead", term, 1, "r1", f"m{term}")), 5)
    exec(code, replica.ns)
    payload = replica.sync.capture(term, code).payload
    done = Done(term, "r1", "ok", term, encode_payload(payload) if payload else None)
    await log.propose(encode_record(done), 5)


def _forged_cell(term: int, marker: Path) -> list[bytes]:
    """The records of a cell whose state update holds a pickle that writes ``marker`` when
    loaded: a ``lead`` (a ``done`` counts only from its term's winner) and the ``done``."""
    data = pickle.dumps((("x",), (Marker(marker),)))
    entry = {"slots": ["x"], "h": xxhash.xxh3_128_hexdigest(data), "v": data}
    payload = {"count": term, "set": [entry], "del": []}
    return [
        encode_record(Proposal("lead", term, 1, "attacker", f"m{term}")),
        encode_record(Done(term, "attacker", "ok", term, encode_payload(payload))),
    ]


async def test_forged_raft_records_are_refused_on_every_replica(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    # The attack is real: the coordinator itself would load the forged record's pickle.
    control, ran = _Replica("rX", loop, KEY), tmp_path / "control"
    for index, record in enumerate(_forged_cell(1, ran), start=1):
        control.coordinator.apply(index, record)
    assert await control.coordinator.caught_up(1, 5) and ran.exists()

    replicas = [_Replica(r, loop, KEY) for r in ("r1", "r2", "r3")]
    group, logs = InMemoryLogGroup.create(
        [r.sealed for r in replicas], addresses=["r1", "r2", "r3"], compaction_entries=4
    )
    executor = SealedLog(logs[0], KEY)  # what the replica group proposes through
    await _propose_cell(replicas[0], executor, 1, "x = 1")
    marker = tmp_path / "marker"
    # Unsealed, sealed with another kernel's key, sealed for another context: all refused.
    for record in _forged_cell(2, marker):
        await logs[1].propose(record, 5)
        await logs[1].propose(seal(OTHER_KEY, RAFT_RECORD, record), 5)
        await logs[1].propose(seal(KEY, "raft:snapshot", record), 5)
    await _propose_cell(replicas[0], executor, 2, "y = x + 1")
    for replica in replicas[1:]:
        assert await replica.coordinator.caught_up(2, 5)
        assert replica.ns["x"] == 1 and replica.ns["y"] == 2
        assert replica.sealed.refusals.count == 6
    assert not marker.exists()

    # A replica that catches up from a (sealed) snapshot gets the same state.
    for term in (3, 4, 5):
        await _propose_cell(replicas[0], executor, term, f"z{term} = {term}")
    assert group.snapshot_index > 0
    newcomer = _Replica("r4", loop, KEY)
    await executor.add_member("r4", 5)
    group.start("r4", newcomer.sealed)
    assert await newcomer.coordinator.caught_up(5, 5)
    assert newcomer.ns["y"] == 2 and newcomer.ns["z5"] == 5
    assert newcomer.sealed.refusals.count == 0


def test_a_forged_raft_snapshot_is_not_installed() -> None:
    loop = asyncio.new_event_loop()
    try:
        replica = _Replica("r1", loop, KEY)
        other = _Replica("r2", loop, OTHER_KEY)
        with pytest.raises(ForgedState, match="Raft log snapshot"):
            replica.sealed.restore(other.sealed.snapshot())
        with pytest.raises(ForgedState, match="not sealed"):
            replica.sealed.restore(replica.coordinator.snapshot())
        replica.sealed.restore(replica.sealed.snapshot())  # its own opens
        assert replica.sealed.refusals.count == 2
    finally:
        loop.close()
