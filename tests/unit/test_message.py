"""Message parsing and new_message, the gateway's own messages."""

from __future__ import annotations

import orjson
import pytest

from nbcluster.protocol import Message, ProtocolError, dumps, new_message


def test_new_message_header() -> None:
    msg = new_message("shell", "kernel_info_request", {}, session="s1", username="u")
    header = msg.header_dict
    assert header["msg_id"] == msg.msg_id and len(msg.msg_id) == 32
    assert header["msg_type"] == "kernel_info_request"
    assert header["session"] == "s1"
    assert header["username"] == "u"
    assert header["version"] == "5.4"
    assert header["date"].endswith("Z")
    assert msg.parent_header == b"{}"
    assert msg.parent_msg_id is None
    assert msg.metadata == b"{}"
    assert new_message("shell", "x", {}).msg_id != msg.msg_id


def test_new_message_parents() -> None:
    request = new_message("shell", "execute_request", {"code": ""})
    from_message = new_message("iopub", "status", {}, parent=request)
    assert from_message.parent_header == request.header  # verbatim, not re-encoded
    assert from_message.parent_msg_id == request.msg_id
    from_bytes = new_message("iopub", "status", {}, parent=request.header)
    assert from_bytes.parent_header == request.header
    assert from_bytes.parent_msg_id == request.msg_id
    from_dict = new_message("iopub", "status", {}, parent={"msg_id": "p", "msg_type": "x"})
    assert orjson.loads(from_dict.parent_header) == {"msg_id": "p", "msg_type": "x"}
    assert from_dict.parent_msg_id == "p"
    odd = new_message("iopub", "status", {}, parent={"msg_id": 5})
    assert odd.parent_msg_id is None


def test_to_dict() -> None:
    msg = new_message(
        "iopub", "stream", {"text": "x"}, parent={"msg_id": "p"}, metadata={"m": 1}, buffers=[b"b"]
    )
    d = msg.to_dict()
    assert d["channel"] == "iopub"
    assert d["msg_id"] == msg.msg_id
    assert d["msg_type"] == "stream"
    assert d["parent_header"] == {"msg_id": "p"}
    assert d["metadata"] == {"m": 1}
    assert d["content"] == {"text": "x"}
    assert d["buffers"] == [b"b"]


def test_content_is_parsed_lazily_when_not_checked() -> None:
    header = dumps({"msg_id": "m", "msg_type": "stream"})
    msg = Message.from_parts("iopub", header, b"{}", b"{}", b"[]", check_body=False)
    assert msg.content == b"[]"
    with pytest.raises(ProtocolError, match="content must be a JSON object, got list"):
        _ = msg.content_dict
    good = Message.from_parts("iopub", header, b"{}", b"{}", b'{"a":1}', check_body=False)
    assert good.content_dict == {"a": 1}


def test_parent_without_msg_id() -> None:
    header = dumps({"msg_id": "m", "msg_type": "stream"})
    msg = Message.from_parts("iopub", header, b'{"msg_type":"x"}', b"{}", b"{}")
    assert msg.parent_msg_id is None


def test_dumps_handles_bytes_and_non_string_keys() -> None:
    assert orjson.loads(dumps({1: b"abc", "x": b"\xff"})) == {"1": "abc", "x": "\ufffd"}
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})
