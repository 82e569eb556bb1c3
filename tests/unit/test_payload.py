"""The sync payload's validation (every malformed field named) and the merged state that
snapshots and checkpoints hold."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.kernel._payload import (
    MergedState,
    decode_payload,
    encode_payload,
    validate_payload,
)

from .strategies import fast

H = "0123456789abcdef0123456789abcdef"


def _entry(*slots: str, h: str = H, **extra: Any) -> dict[str, Any]:
    return {"slots": list(slots), "h": h, "v": b"x", **extra}


def _payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"count": 1, "set": [_entry("x")], "del": []}
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    return payload


MALFORMED = [
    (b"", "not valid msgpack"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb(_payload(count=...)), "missing field 'count'"),
    (msgpack.packb(_payload(bogus=1)), "unknown field 'bogus'"),
    (msgpack.packb(_payload(count=-1)), "'count' must be an int"),
    (msgpack.packb(_payload(count=True)), "'count' must be an int"),
    (msgpack.packb(_payload(set={})), "'set' must be a list"),
    (msgpack.packb(_payload(set=[1])), "set[0] must be a map"),
    (msgpack.packb(_payload(set=[_entry("x", h="ABC")])), "'h' must be 32 lowercase hex"),
    (msgpack.packb(_payload(set=[_entry()])), "slots is empty"),
    (msgpack.packb(_payload(set=[_entry("x y")])), "is not a name, Out[N], @module:attribute"),
    (msgpack.packb(_payload(set=[_entry("x", ptr="k", size=1)])), "must have slots, h and v"),
    (msgpack.packb(_payload(set=[_entry("x", live=["y"])])), "live names slots"),
    (msgpack.packb(_payload(set=[_entry("x"), _entry("x")])), "an earlier entry ships too"),
    (msgpack.packb(_payload(**{"del": ["x"]})), "'x' is both in 'set' and in 'del'"),
    (msgpack.packb(_payload(**{"del": [1]})), "del[0] must be a non-empty str"),
    (msgpack.packb(_payload(unpicklable=["x"])), "'x' is in 'unpicklable'"),
    (msgpack.packb(_payload(inputs=[[0, "a"]])), "inputs[0] must be"),
    (msgpack.packb(_payload(interp={"cwd": "str"})), "'interp' must map"),
    (msgpack.packb(_payload(files=[{"path": "../x", "h": H, "v": b""}])), "relative path"),
    (msgpack.packb(_payload(files=[{"path": "/etc/x", "h": H, "v": b""}])), "relative path"),
    (msgpack.packb(_payload(full=1)), "'full' must be a bool"),
]


@pytest.mark.parametrize(("data", "problem"), MALFORMED)
def test_malformed_payloads_are_rejected_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match="malformed sync payload") as info:
        decode_payload(data)
    assert problem in str(info.value)


def test_slots_of_every_kind_and_a_round_trip() -> None:
    payload = _payload(
        set=[
            _entry("x", "Out[3]", "@json:flag", "@pandas:DataFrame.nice", "%line:shout", "!event:x")
        ],
        inputs=[[3, "x"]],
        interp={"cwd": b"\x01"},
        files=[{"path": "pkg/mod.py", "h": H, "v": b"A = 1\n"}],
    )
    checked = decode_payload(encode_payload(payload))
    assert checked["set"][0]["slots"][:4] == ["x", "Out[3]", "@json:flag", "@pandas:DataFrame.nice"]
    assert checked["inputs"] == [[3, "x"]] and checked["files"][0]["path"] == "pkg/mod.py"
    minimal = validate_payload({"count": 0, "set": [], "del": []})
    assert minimal["interp"] == {} and minimal["packages"] == [] and "full" not in minimal


def _digest(i: int) -> str:
    return f"{i:032x}"


def test_merged_state_keeps_only_the_live_slots_of_each_entry() -> None:
    state = MergedState()
    state.merge(validate_payload(_payload(set=[_entry("a", "b", h=_digest(1))])))
    inputs = [[1, "%time b", "get_ipython().run_line_magic('time', 'b')"]]
    state.merge(validate_payload(_payload(set=[_entry("b", h=_digest(2))], inputs=inputs)))
    state.merge(validate_payload(_payload(set=[], **{"del": ["a"]})))
    # the first entry only held a and b; b was replaced, a deleted: it is gone
    assert list(state.entries) == [_digest(2)]
    full = state.to_payload(5)
    assert full["full"] is True and full["count"] == 5
    assert [e["live"] for e in full["set"]] == [["b"]]
    again = MergedState.from_primitive(state.to_primitive())
    assert again.owner == state.owner and again.inputs == {1: inputs[0]}


@fast
@given(
    st.lists(
        st.tuples(st.sets(st.sampled_from("abcde"), min_size=1), st.booleans()),
        max_size=12,
    )
)
def test_merged_state_owns_each_slot_once(cells: list[tuple[set[str], bool]]) -> None:
    state = MergedState()
    latest: dict[str, str] = {}
    for i, (slots, delete) in enumerate(cells):
        ordered = sorted(slots)
        if delete:
            state.merge(validate_payload(_payload(set=[], **{"del": ordered})))
            for slot in ordered:
                latest.pop(slot, None)
        else:
            state.merge(validate_payload(_payload(set=[_entry(*ordered, h=_digest(i))])))
            latest.update(dict.fromkeys(ordered, _digest(i)))
    assert state.owner == latest
    live = [s for e in state.entries.values() for s in e["live"]]
    assert sorted(live) == sorted(latest)


def test_warnings_given_travel_as_plain_strings() -> None:
    base = {"count": 1, "set": [], "del": []}
    assert validate_payload({**base, "told": ["widgets", "lossy:z:why"]})["told"] == [
        "widgets",
        "lossy:z:why",
    ]
    with pytest.raises(ValueError, match="'told'"):
        validate_payload({**base, "told": [1]})
    with pytest.raises(ValueError, match="'told'"):
        validate_payload({**base, "told": "widgets"})
