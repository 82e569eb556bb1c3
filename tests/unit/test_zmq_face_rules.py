"""The ZMQ face's pure decisions: which client requests the face answers itself, IOPub
published once, the port range, the address in the connection info; and the connection
file model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from nbcluster.gateway import PortRange, parse_port_range
from nbcluster.gateway._face_rules import PublishedOnce, advertised_ip, classify
from nbcluster.protocol import KernelConnection, new_message


@pytest.mark.parametrize(
    ("channel", "msg_type", "content", "action"),
    [
        ("shell", "execute_request", {"code": "1"}, "forward"),
        ("shell", "complete_request", {}, "forward"),
        ("stdin", "input_reply", {"value": "x"}, "forward"),
        ("control", "debug_request", {}, "forward"),
        ("control", "interrupt_request", {}, "interrupt"),
        # Only on control, where jupyter_client sends it; on shell it is the replica's.
        ("shell", "interrupt_request", {}, "forward"),
        ("control", "shutdown_request", {"restart": False}, "shutdown"),
        ("shell", "shutdown_request", {}, "shutdown"),
        ("control", "shutdown_request", {"restart": True}, "restart_ack"),
    ],
)
def test_classify(channel: str, msg_type: str, content: dict[str, object], action: str) -> None:
    assert classify(new_message(channel, msg_type, content)) == action


@given(st.lists(st.sampled_from([f"m{i}" for i in range(20)]), max_size=200))
def test_each_message_is_published_once(ids: list[str]) -> None:
    published = PublishedOnce(limit=1000)
    firsts = [i for i in ids if published.first(i)]
    assert firsts == list(dict.fromkeys(ids))


def test_published_once_forgets_the_oldest_past_its_limit() -> None:
    published = PublishedOnce(limit=2)
    assert [published.first(i) for i in ("a", "b", "c", "a")] == [True, True, True, True]


def test_port_range_parses_and_names_what_is_wrong() -> None:
    assert parse_port_range("40000..40009") == PortRange(40000, 40009)
    assert parse_port_range("40000-40009").size == 10
    with pytest.raises(ValueError, match=r"is not LOW\.\.HIGH"):
        parse_port_range("40000")
    with pytest.raises(ValueError, match="must be integers"):
        parse_port_range("a..b")
    with pytest.raises(ValueError, match="needs 5"):
        parse_port_range("40000..40003")
    with pytest.raises(ValueError, match=r"within 1024\.\.65535"):
        parse_port_range("80..90")
    with pytest.raises(ValueError, match="low <= high"):
        parse_port_range("41000..40000")


@given(st.integers(1024, 65000), st.integers(4, 200))
def test_candidates_are_every_port_of_the_range_once(low: int, extra: int) -> None:
    ports = PortRange(low, min(low + extra, 65535))
    assert sorted(ports.candidates()) == list(range(ports.low, ports.high + 1))


def test_advertised_ip() -> None:
    assert advertised_ip("127.0.0.1", None) == "127.0.0.1"
    assert advertised_ip("10.0.0.5", "https://gw.example.org") == "10.0.0.5"
    assert advertised_ip("0.0.0.0", "https://gw.example.org:8889") == "gw.example.org"
    assert advertised_ip("0.0.0.0", None) == "127.0.0.1"


def test_connection_model_is_a_connection_file() -> None:
    connection = KernelConnection(
        ip="127.0.0.1",
        shell_port=1,
        iopub_port=2,
        stdin_port=3,
        control_port=4,
        hb_port=5,
        key="k" * 64,
    )
    assert "curve_publickey" not in connection.connection_file()
    assert connection.connection_file()["signature_scheme"] == "hmac-sha256"
    with pytest.raises(ValidationError, match="shell_port"):
        KernelConnection.model_validate({**connection.connection_file(), "shell_port": 0})
    with pytest.raises(ValidationError, match="curve_publickey"):
        KernelConnection.model_validate(
            {**connection.connection_file(), "curve_publickey": "short"}
        )
