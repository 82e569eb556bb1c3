"""The Raft port's frame plaintext (``consensus/_raft_port``): small messages go uncompressed
behind a marker byte, large ones zlib-compressed, and both decode, as do frames compressed
the way pysyncobj itself writes them."""

from __future__ import annotations

import zlib

import pysyncobj.pickle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.consensus._raft_port import COMPRESS_ABOVE, _decode, _encode

SMALL = ("key", {"type": "append_entries", "term": 3, "entries": [(b"x" * 300, 7, 3)]})


def test_a_small_message_is_not_compressed() -> None:
    data = _encode(SMALL)
    assert data[:1] == b"\x00"
    assert pysyncobj.pickle.loads(data[1:]) == SMALL
    assert _decode(data) == SMALL


def test_a_large_message_is_compressed() -> None:
    message = {"type": "append_entries", "entries": [(b"y" * COMPRESS_ABOVE, 1, 1)]}
    data = _encode(message)
    assert data[:1] != b"\x00"
    assert len(data) < COMPRESS_ABOVE // 10  # repetitive bytes compress well
    assert _decode(data) == message


def test_a_frame_compressed_as_pysyncobj_writes_it_decodes() -> None:
    legacy = zlib.compress(pysyncobj.pickle.dumps(SMALL), 3)
    assert legacy[:1] != b"\x00"  # a zlib stream's first byte names deflate
    assert _decode(legacy) == SMALL


def test_garbage_does_not_decode() -> None:
    with pytest.raises(KeyError):  # pickle's opcode "n" does not exist
        _decode(b"\x00not a pickle")
    with pytest.raises(zlib.error):
        _decode(b"\x78garbage")


@given(st.binary(max_size=4 * COMPRESS_ABOVE // 3), st.integers())
def test_every_message_round_trips(blob: bytes, number: int) -> None:
    message = ("k", {"blob": blob, "n": number})
    assert _decode(_encode(message)) == message
