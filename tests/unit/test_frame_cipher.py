"""``consensus._frame_cipher.FrameCipher``: the Raft port's AES-GCM frames open only with
the kernel's key and only unaltered, timestamp included."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.consensus._frame_cipher import FrameCipher, FrameError

CIPHER = FrameCipher.from_password("0123456789abcdef0123456789abcdef")


@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=2**63))
def test_a_sealed_frame_opens_with_its_timestamp(data: bytes, timestamp: int) -> None:
    token = CIPHER.seal(data, timestamp)
    assert FrameCipher.timestamp(token) == timestamp
    assert CIPHER.open(token) == data


def test_the_plaintext_does_not_show() -> None:
    secret = b"a notebook variable's value, in clear"
    assert secret not in CIPHER.seal(secret, 1)  # encrypted, not merely signed


def test_the_same_plaintext_seals_differently() -> None:
    assert CIPHER.seal(b"x" * 32, 1) != CIPHER.seal(b"x" * 32, 1)  # fresh nonces


@given(st.integers(min_value=0, max_value=8 + 12 + 16 + 20 - 1), st.integers(1, 255))
def test_any_altered_byte_is_refused(position: int, flip: int) -> None:
    token = bytearray(CIPHER.seal(b"a twenty byte record", 7))
    token[position] ^= flip
    with pytest.raises(FrameError):
        CIPHER.open(bytes(token))


def test_another_password_cannot_open_it() -> None:
    other = FrameCipher.from_password("another kernel's password")
    with pytest.raises(FrameError, match="not sealed with this kernel's key"):
        other.open(CIPHER.seal(b"secret", 1))


def test_garbage_and_short_frames_are_refused() -> None:
    for token in (b"", b"\x01short", b"\x02" + bytes(40), bytes(100)):
        with pytest.raises(FrameError):
            FrameCipher.timestamp(token)
        with pytest.raises(FrameError):
            CIPHER.open(token)


def test_the_key_has_the_right_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        FrameCipher(b"short")
