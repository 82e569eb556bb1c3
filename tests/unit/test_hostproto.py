"""Control frames between the gateway and host daemons."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.hostproto import (
    PROTOCOL_VERSION,
    ConnectionInfo,
    GpuInfo,
    Heartbeat,
    Hello,
    HostProtocolError,
    HostResources,
    ReplicaExited,
    ReplicaReport,
    Reply,
    SignalReplica,
    StartReplica,
    StopReplica,
    Welcome,
    decode_gateway_message,
    decode_host_message,
    encode,
)

CONNECTION = ConnectionInfo(
    ip="10.0.0.2",
    shell_port=5001,
    iopub_port=5002,
    stdin_port=5003,
    control_port=5004,
    hb_port=5005,
)
RESOURCES = HostResources(
    cpus=16,
    memory_mb=64_000,
    gpus=[GpuInfo(index=0, uuid="GPU-1", name="H100", memory_mb=80_000, virtual=False)],
)


def _hello(**overrides: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "hello",
        "name": "host-1",
        "address": "10.0.0.2",
        "resources": RESOURCES.model_dump(),
    }
    frame.update(overrides)
    return frame


HOST_MESSAGES = [
    Hello(
        name="gpu-node_07.rack-2",
        address="10.0.0.2",
        resources=RESOURCES,
        replicas=[ReplicaReport(kernel_id="k", replica_id="r", pid=42, connection=CONNECTION)],
    ),
    Heartbeat(replicas=3),
    Reply(request_id="h-1", ok=True, result={"pid": 1}),
    Reply(request_id="h-2", ok=False, error="no such replica"),
    ReplicaExited(kernel_id="k", replica_id="r", exit_code=None, requested=False, log_tail="boom"),
]

GATEWAY_MESSAGES = [
    Welcome(heartbeat_interval=1.5),
    StartReplica(
        request_id="1",
        kernel_id="k",
        replica_id="r",
        argv=["python", "-f", "{connection_file}"],
        env={"KERNEL_GPUS": "1"},
        key="abc",
        working_dir="/tmp",
    ),
    StopReplica(request_id="2", replica_id="r", grace=0.5),
    SignalReplica(request_id="3", replica_id="r", signum=2),
]


@pytest.mark.parametrize("message", HOST_MESSAGES, ids=lambda m: type(m).__name__)
def test_host_messages_round_trip(message: Any) -> None:
    frame = encode(message)
    assert json.loads(frame)["type"] == message.type
    assert decode_host_message(frame) == message
    assert decode_host_message(frame.encode()) == message


@pytest.mark.parametrize("message", GATEWAY_MESSAGES, ids=lambda m: type(m).__name__)
def test_gateway_messages_round_trip(message: Any) -> None:
    frame = encode(message)
    assert decode_gateway_message(frame) == message


def test_defaults() -> None:
    hello = decode_host_message(json.dumps(_hello()))
    assert isinstance(hello, Hello)
    assert hello.protocol == PROTOCOL_VERSION
    assert hello.replicas == []
    assert hello.resources.gpus[0].name == "H100"
    start = decode_gateway_message(
        '{"type":"start_replica","request_id":"1","kernel_id":"k","replica_id":"r",'
        '"argv":["x"],"key":"k"}'
    )
    assert isinstance(start, StartReplica)
    assert start.signature_scheme == "hmac-sha256"
    assert start.env == {}
    assert start.launch_timeout == 30.0
    connection = ConnectionInfo.model_validate(
        {k: v for k, v in CONNECTION.model_dump().items() if k != "transport"}
    )
    assert connection.transport == "tcp"


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (_hello(name="bad name!"), "hello.name: String should match pattern"),
        (_hello(name="a/b"), "hello.name"),
        (_hello(name=""), "hello.name"),
        (_hello(name="x" * 129), "hello.name"),
        (_hello(address=None), "hello.address"),
        (
            {k: v for k, v in _hello().items() if k != "resources"},
            "hello.resources: Field required",
        ),
        (_hello(resources={"cpus": "many", "memory_mb": 1}), "hello.resources.cpus"),
        (_hello(extra=1), "hello.extra: Extra inputs are not permitted"),
        ({"type": "bogus"}, "Input tag 'bogus'"),
        ({"type": "welcome", "heartbeat_interval": 1}, "Input tag 'welcome'"),
        ({"name": "host-1"}, "discriminator 'type'"),
        ({"type": "reply", "ok": True}, "reply.request_id: Field required"),
        ({"type": "reply", "request_id": "x", "ok": "perhaps"}, "reply.ok"),
        (
            {"type": "replica_exited", "kernel_id": "k", "replica_id": "r", "requested": False},
            "replica_exited.exit_code: Field required",
        ),
        ({"type": "heartbeat", "replicas": "three"}, "heartbeat.replicas"),
        ([], "Input should be an object"),
    ],
)
def test_invalid_host_frames(frame: Any, expected: str) -> None:
    with pytest.raises(HostProtocolError) as info:
        decode_host_message(json.dumps(frame))
    assert str(info.value).startswith("invalid host message: ")
    assert expected in str(info.value)


@pytest.mark.parametrize("frame", ["not json", "", "{", b"\xff\xfe"])
def test_host_frame_that_is_not_json(frame: str | bytes) -> None:
    with pytest.raises(HostProtocolError, match="Invalid JSON"):
        decode_host_message(frame)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "welcome"}, "welcome.heartbeat_interval: Field required"),
        (
            {
                "type": "start_replica",
                "request_id": "1",
                "kernel_id": "k",
                "replica_id": "r",
                "argv": [],
                "key": "k",
            },
            "start_replica.argv: List should have at least 1 item",
        ),
        ({"type": "stop_replica", "request_id": "1"}, "stop_replica.replica_id: Field required"),
        (
            {"type": "signal_replica", "request_id": "1", "replica_id": "r", "signum": "INT"},
            "signal_replica.signum",
        ),
        ({"type": "hello"}, "Input tag 'hello'"),
        ({}, "discriminator 'type'"),
    ],
)
def test_invalid_gateway_frames(frame: Any, expected: str) -> None:
    with pytest.raises(HostProtocolError) as info:
        decode_gateway_message(json.dumps(frame))
    assert str(info.value).startswith("invalid gateway message: ")
    assert expected in str(info.value)


def test_gateway_frame_that_is_not_json() -> None:
    with pytest.raises(HostProtocolError, match="Invalid JSON"):
        decode_gateway_message("<html>")


def test_error_text_lists_at_most_five_problems() -> None:
    with pytest.raises(HostProtocolError) as info:
        decode_host_message(json.dumps({"type": "replica_exited", "a": 1, "b": 2, "c": 3}))
    assert str(info.value).count(";") == 4


def test_messages_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        Heartbeat().replicas = 2  # type: ignore[misc]


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_frames_raise_only_host_protocol_errors(frame: str | bytes) -> None:
    for decode in (decode_host_message, decode_gateway_message):
        try:
            decode(frame)
        except HostProtocolError as exc:
            assert str(exc).startswith("invalid ")
