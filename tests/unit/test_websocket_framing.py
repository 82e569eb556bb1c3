"""The legacy and v1 websocket framings, checked against jupyter_server's own codecs."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_client.jsonutil import extract_dates
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from nbcluster.protocol import (
    CLIENT_CHANNELS,
    KERNEL_CHANNELS,
    V1_SUBPROTOCOL,
    Message,
    ProtocolError,
    decode_legacy,
    decode_v1,
    dumps,
    encode_legacy,
    encode_v1,
)

from .strategies import buffers, fast, headers, json_objects, kernel_channels, make_message


def _message(
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
) -> Message:
    return Message.from_parts(
        channel, dumps(header), dumps(parent), dumps(metadata), dumps(content), bufs
    )


def _their_legacy_decode(frame: str | bytes) -> dict[str, Any]:
    """What jupyter_server's gateway client does with a frame from us."""
    if isinstance(frame, bytes):
        return dict(deserialize_binary_message(frame))
    msg = json.loads(frame)
    msg.setdefault("buffers", [])
    return dict(msg)


def _assert_same(
    decoded: dict[str, Any],
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
) -> None:
    # jupyter_server turns ISO dates in headers into datetimes: compare both sides that way.
    assert extract_dates(decoded["header"]) == extract_dates(header)
    assert extract_dates(decoded["parent_header"]) == extract_dates(parent)
    assert decoded["metadata"] == metadata
    assert decoded["content"] == content
    assert [bytes(b) for b in decoded["buffers"]] == bufs
    assert decoded["channel"] == channel


def test_subprotocol_name() -> None:
    assert V1_SUBPROTOCOL == "v1.kernel.websocket.jupyter.org"


# -- legacy -----------------------------------------------------------------------------------


@fast
@given(kernel_channels, headers, json_objects, json_objects, json_objects, buffers)
def test_legacy_ours_to_theirs(
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
) -> None:
    frame = encode_legacy(_message(channel, header, parent, metadata, content, bufs))
    # Text when there are no buffers (what JupyterLab and jupyter_server expect), else binary.
    assert isinstance(frame, bytes) == bool(bufs)
    decoded = _their_legacy_decode(frame)
    _assert_same(decoded, channel, header, parent, metadata, content, bufs)
    assert decoded["msg_id"] == header["msg_id"]
    assert decoded["msg_type"] == header["msg_type"]


@fast
@given(
    kernel_channels,
    headers,
    json_objects,
    json_objects,
    json_objects,
    buffers,
    st.booleans(),
)
def test_legacy_theirs_to_ours(
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
    binary: bool,
) -> None:
    msg = {
        "channel": channel,
        "header": header,
        "msg_id": header["msg_id"],
        "msg_type": header["msg_type"],
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": bufs,
    }
    frame: str | bytes
    if bufs or binary:  # a binary frame may also carry no buffers at all
        frame = serialize_binary_message(msg)
    else:
        frame = json.dumps({k: v for k, v in msg.items() if k != "buffers"})
    ours = decode_legacy(frame, KERNEL_CHANNELS)
    assert ours.msg_id == header["msg_id"]
    assert ours.msg_type == header["msg_type"]
    parent_id = parent.get("msg_id")
    assert ours.parent_msg_id == (parent_id if isinstance(parent_id, str) and parent_id else None)
    _assert_same(ours.to_dict(), channel, header, parent, metadata, content, bufs)


def test_legacy_parent_msg_id_is_parsed() -> None:
    parent = {"msg_id": "p-1", "msg_type": "execute_request"}
    msg = make_message("iopub", "stream", {"name": "stdout", "text": "x"}, parent=parent)
    ours = decode_legacy(encode_legacy(msg), KERNEL_CHANNELS)
    assert ours.parent_msg_id == "p-1"
    assert ours.parent_header == dumps(parent)


def test_legacy_missing_optional_parts_default_to_empty_objects() -> None:
    frame = json.dumps(
        {
            "channel": "shell",
            "header": {"msg_id": "a", "msg_type": "kernel_info_request"},
            "content": {},
        }
    )
    msg = decode_legacy(frame)
    assert msg.parent_header == b"{}"
    assert msg.metadata == b"{}"
    assert msg.parent_msg_id is None
    assert msg.buffers == []


def test_legacy_binary_encoding_layout() -> None:
    msg = make_message("iopub", "comm_msg", {"data": {}}, buffers=[b"abc", b""])
    frame = encode_legacy(msg)
    assert isinstance(frame, bytes)
    count, first, second, third = struct.unpack_from("!4I", frame)
    assert count == 3
    assert first == 16
    assert frame[third:] == b""  # the empty buffer at the end
    assert frame[second:third] == b"abc"
    assert orjson.loads(frame[first:second])["content"] == {"data": {}}


# -- v1 ---------------------------------------------------------------------------------------


@fast
@given(kernel_channels, headers, json_objects, json_objects, json_objects, buffers)
def test_v1_ours_to_theirs(
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
) -> None:
    frame = encode_v1(_message(channel, header, parent, metadata, content, bufs))
    their_channel, parts = deserialize_msg_from_ws_v1(frame)
    assert their_channel == channel
    assert len(parts) == 4 + len(bufs)
    assert json.loads(parts[0]) == header
    assert json.loads(parts[1]) == parent
    assert json.loads(parts[2]) == metadata
    assert json.loads(parts[3]) == content
    assert [bytes(p) for p in parts[4:]] == bufs


@fast
@given(kernel_channels, headers, json_objects, json_objects, json_objects, buffers)
def test_v1_theirs_to_ours(
    channel: str,
    header: dict[str, Any],
    parent: dict[str, Any],
    metadata: dict[str, Any],
    content: dict[str, Any],
    bufs: list[bytes],
) -> None:
    parts = [json.dumps(p).encode() for p in (header, parent, metadata, content)]
    frame = serialize_msg_to_ws_v1([*parts, *bufs], channel)
    ours = decode_v1(frame, KERNEL_CHANNELS)
    assert ours.msg_id == header["msg_id"]
    assert ours.msg_type == header["msg_type"]
    _assert_same(ours.to_dict(), channel, header, parent, metadata, content, bufs)
    # v1 forwards the raw parts untouched: no JSON is re-encoded.
    assert [ours.header, ours.parent_header, ours.metadata, ours.content] == parts


def test_v1_theirs_with_pack_to_ours() -> None:
    msg = {
        "header": {"msg_id": "m", "msg_type": "execute_request"},
        "parent_header": {},
        "metadata": {"deletedCells": []},
        "content": {"code": "print(1)", "silent": False},
    }
    frame = serialize_msg_to_ws_v1(msg, "shell", pack=lambda o: json.dumps(o).encode())
    ours = decode_v1(frame)
    assert ours.channel == "shell"
    assert ours.content_dict == msg["content"]
    assert ours.parent_msg_id is None


def test_v1_empty_parent_and_metadata_read_as_empty_objects() -> None:
    frame = serialize_msg_to_ws_v1(
        [b'{"msg_id":"a","msg_type":"kernel_info_request"}', b"", b"", b"{}"], "control"
    )
    msg = decode_v1(frame)
    assert msg.parent_header == b"{}"
    assert msg.metadata == b"{}"
    assert msg.to_dict()["parent_header"] == {}


@given(kernel_channels, headers, json_objects, buffers)
def test_v1_round_trip_is_byte_exact(
    channel: str, header: dict[str, Any], content: dict[str, Any], bufs: list[bytes]
) -> None:
    msg = _message(channel, header, {}, {}, content, bufs)
    frame = encode_v1(msg)
    back = decode_v1(frame, KERNEL_CHANNELS)
    assert (back.header, back.parent_header, back.metadata, back.content) == (
        msg.header,
        msg.parent_header,
        msg.metadata,
        msg.content,
    )
    assert back.buffers == bufs
    assert encode_v1(back) == frame


# -- malformed legacy frames ------------------------------------------------------------------

_HEADER = {"msg_id": "a", "msg_type": "execute_request"}


def _legacy(**fields: Any) -> str:
    msg: dict[str, Any] = {"channel": "shell", "header": _HEADER, "content": {}}
    for key, value in fields.items():
        if value is _MISSING:
            msg.pop(key)
        else:
            msg[key] = value
    return json.dumps(msg)


_MISSING = object()


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('"shell"', "must hold a JSON object"),
        (_legacy(channel=_MISSING), "no 'channel'"),
        (_legacy(channel=3), "no 'channel'"),
        (_legacy(channel="iopub"), "unknown channel 'iopub'"),
        (_legacy(channel="hb"), "unknown channel 'hb'"),
        (_legacy(header=_MISSING), "no 'header'"),
        (_legacy(header=None), "no 'header'"),
        (_legacy(header=[1]), "'header' must be a JSON object, got list"),
        (_legacy(header={}), "no 'msg_id'"),
        (_legacy(header={"msg_type": "execute_request"}), "no 'msg_id'"),
        (_legacy(header={"msg_id": 7, "msg_type": "execute_request"}), "no 'msg_id'"),
        (_legacy(header={"msg_id": "", "msg_type": "execute_request"}), "no 'msg_id'"),
        (_legacy(header={"msg_id": "a"}), "no 'msg_type'"),
        (_legacy(content=_MISSING), "no 'content'"),
        (_legacy(content=[]), "'content' must be a JSON object, got list"),
        (_legacy(content="code"), "'content' must be a JSON object, got str"),
        (_legacy(metadata=3), "'metadata' must be a JSON object, got int"),
        (_legacy(parent_header="p"), "'parent_header' must be a JSON object, got str"),
    ],
)
def test_legacy_text_rejections(frame: str, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        decode_legacy(frame)


def test_legacy_unknown_channel_lists_the_allowed_ones() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_legacy(_legacy(channel="iopub"))
    for channel in sorted(CLIENT_CHANNELS):
        assert channel in str(info.value)


def test_legacy_deeply_nested_content_is_a_protocol_error() -> None:
    # Deep enough to parse but too deep for orjson to serialise again: must not escape as a
    # TypeError (that would end the client's websocket handler).
    deep = "[" * 300 + "]" * 300
    frame = (
        '{"channel":"shell","header":{"msg_id":"a","msg_type":"x"},"content":{"a":' + deep + "}}"
    )
    with pytest.raises(ProtocolError, match="content"):
        decode_legacy(frame)


def _legacy_binary(parts: list[bytes], offsets: list[int] | None = None) -> bytes:
    count = len(parts)
    if offsets is None:
        offsets = [4 * (count + 1)]
        for part in parts[:-1]:
            offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{count + 1}I", count, *offsets) + b"".join(parts)


_BODY = _legacy().encode()


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"", "too short"),
        (b"\x00\x00\x00\x01", "too short"),
        (struct.pack("!2I", 0, 8), "declares 0 parts"),
        (struct.pack("!2I", 5, 8), "declares 5 parts"),
        (struct.pack("!I", 2**32 - 1) + b"\x00" * 8, "declares 4294967295 parts"),
        (_legacy_binary([_BODY, b"buf"], [8, 12 + len(_BODY)]), "inconsistent offsets"),
        (_legacy_binary([_BODY, b"buf"], [12, 11]), "inconsistent offsets"),
        (_legacy_binary([_BODY, b"buf"], [12, 10_000]), "inconsistent offsets"),
        # truncated inside the JSON part: the buffer's offset points past the end
        (_legacy_binary([_BODY, b"buf"])[: 12 + len(_BODY) - 1], "inconsistent offsets"),
        # truncated inside the offset table
        (_legacy_binary([_BODY, b"a", b"b", b"c"])[:14], "does not fit"),
        (_legacy_binary([b"{not json", b"buf"]), "not valid JSON"),
    ],
)
def test_legacy_binary_rejections(frame: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        decode_legacy(frame)


def test_legacy_binary_valid_frame_is_accepted() -> None:
    msg = decode_legacy(_legacy_binary([_BODY, b"buf", b""]))
    assert msg.buffers == [b"buf", b""]
    assert msg.msg_id == "a"


# -- malformed v1 frames ----------------------------------------------------------------------


def _v1(parts: list[bytes], channel: bytes = b"shell") -> bytes:
    count = len(parts) + 2
    offsets = [8 * (count + 1), 8 * (count + 1) + len(channel)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + channel + b"".join(parts)


_GOOD_V1_PARTS = [b'{"msg_id":"a","msg_type":"execute_request"}', b"{}", b"{}", b"{}"]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"", "too short"),
        (b"\x06\x00", "too short"),
        (struct.pack("<Q", 3) + b"\x00" * 40, "declares 3 offsets"),
        (struct.pack("<Q", 2**40) + b"\x00" * 64, "declares 1099511627776 offsets"),
        (_v1(_GOOD_V1_PARTS)[:-1], "inconsistent offsets"),
        (_v1(_GOOD_V1_PARTS) + b"x", "inconsistent offsets"),
        (
            struct.pack("<7Q", 6, 56, 61, 60, 65, 67, 69) + b"shell{}{}{}{}",
            "inconsistent offsets",
        ),
        # the first offset must point just past the offset table
        (
            struct.pack("<7Q", 6, 64, 69, 69, 71, 73, 75) + b"\x00" * 8 + b"shell{}{}{}",
            "inconsistent offsets",
        ),
        (_v1(_GOOD_V1_PARTS, channel=b"\xff\xfe"), "not UTF-8"),
        (_v1(_GOOD_V1_PARTS, channel=b"iopub"), "unknown channel 'iopub'"),
        (_v1(_GOOD_V1_PARTS, channel=b""), "unknown channel ''"),
        (_v1([b"{nope", b"{}", b"{}", b"{}"]), "header is not valid JSON"),
        (_v1([b"[]", b"{}", b"{}", b"{}"]), "header must be a JSON object, got list"),
        (_v1([b'{"msg_type":"x"}', b"{}", b"{}", b"{}"]), "no 'msg_id'"),
        (_v1([b'{"msg_id":"a"}', b"{}", b"{}", b"{}"]), "no 'msg_type'"),
        (_v1([*_GOOD_V1_PARTS[:3], b"[]"]), "content must be a JSON object, got list"),
        (_v1([*_GOOD_V1_PARTS[:3], b""]), "content is not valid JSON"),
        (_v1([*_GOOD_V1_PARTS[:2], b"1", b"{}"]), "metadata must be a JSON object, got int"),
        (_v1([_GOOD_V1_PARTS[0], b"[", b"{}", b"{}"]), "parent_header is not valid JSON"),
    ],
)
def test_v1_rejections(frame: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        decode_v1(frame)


def test_v1_text_frame_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="binary frames only"):
        decode_v1(_legacy())


def test_v1_valid_handmade_frame_is_accepted() -> None:
    msg = decode_v1(_v1([*_GOOD_V1_PARTS, b"b1"]))
    assert (msg.channel, msg.msg_id, msg.buffers) == ("shell", "a", [b"b1"])


# -- fuzzing ----------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(frame: bytes) -> None:
    for decode in (decode_legacy, decode_v1):
        with contextlib.suppress(ProtocolError):
            decode(frame)


@given(st.text(max_size=300))
def test_random_text_raises_only_protocol_errors(frame: str) -> None:
    for decode in (decode_legacy, decode_v1):
        with contextlib.suppress(ProtocolError):
            decode(frame)


@given(
    st.dictionaries(
        st.sampled_from(["channel", "header", "parent_header", "metadata", "content", "buffers"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=8,
        ),
    )
)
def test_arbitrary_legacy_objects_raise_only_protocol_errors(msg: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_legacy(json.dumps(msg))


@given(
    st.sampled_from(["legacy", "v1"]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10_000),
)
def test_mutated_valid_frames_raise_only_protocol_errors(
    framing: str, flips: list[tuple[int, int]], cut: int
) -> None:
    msg = make_message("shell", "execute_request", {"code": "x"}, buffers=[b"abc"])
    frame = bytearray(encode_v1(msg) if framing == "v1" else encode_legacy(msg))  # type: ignore[arg-type]
    for position, value in flips:
        frame[position % len(frame)] = value
    data = bytes(frame[: len(frame) - cut % len(frame)])
    decode = decode_v1 if framing == "v1" else decode_legacy
    try:
        decoded = decode(data)
    except ProtocolError:
        return
    assert decoded.channel in CLIENT_CHANNELS
    assert decoded.msg_id
