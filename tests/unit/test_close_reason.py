"""Websocket close reasons stay within RFC 6455's 123 bytes of valid UTF-8, whatever they name
(a fuzzed host frame once carried a key of 2-byte characters past the cap: the connection was
dropped without a close frame)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbcluster.gateway._close_reason import MAX_CLOSE_REASON_BYTES, close_reason


def test_a_short_ascii_reason_is_kept() -> None:
    assert close_reason("expected a hello first") == "expected a hello first"


def test_a_long_multibyte_reason_is_cut_on_a_character_boundary() -> None:
    reason = close_reason("invalid host message: " + "\u0096\u86c0" * 80)
    encoded = reason.encode()
    assert len(encoded) <= MAX_CLOSE_REASON_BYTES
    assert reason.startswith("invalid host message: \u0096\u86c0")
    assert reason.endswith("…")


def test_a_lone_surrogate_is_replaced() -> None:
    assert close_reason("bad key \udbd8") == "bad key ?"


@given(st.text())
def test_every_reason_encodes_within_the_cap(text: str) -> None:
    encoded = close_reason(text).encode("utf-8")  # raises on a surrogate left in
    assert len(encoded) <= MAX_CLOSE_REASON_BYTES
