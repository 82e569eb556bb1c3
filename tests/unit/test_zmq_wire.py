"""The signed ZMQ wire format, cross-checked with jupyter_client's Session."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_client.jsonutil import extract_dates
from jupyter_client.session import Session

from nbcluster.protocol import DELIMITER, ProtocolError, Signer, decode_zmq, dumps, encode_zmq

from .strategies import buffers, fast, json_objects, make_message

KEY = b"0123456789abcdef-secret"

identities = st.lists(
    st.binary(min_size=1, max_size=16).filter(lambda b: b != DELIMITER), max_size=3
)


@fast
@given(identities, json_objects, json_objects, buffers)
def test_round_trip(
    idents: list[bytes], content: dict[str, Any], metadata: dict[str, Any], bufs: list[bytes]
) -> None:
    signer = Signer(KEY)
    msg = make_message("shell", "execute_request", content, metadata=metadata, buffers=bufs)
    frames = encode_zmq(msg, signer, idents)
    assert frames[len(idents)] == DELIMITER
    got_idents, back = decode_zmq("shell", frames, signer, check_body=True)
    assert got_idents == idents
    assert (back.header, back.parent_header, back.metadata, back.content) == (
        msg.header,
        msg.parent_header,
        msg.metadata,
        msg.content,
    )
    assert back.buffers == bufs
    assert back.msg_id == msg.msg_id
    assert back.msg_type == "execute_request"
    assert back.content_dict == content


def test_signature_is_hmac_sha256_over_the_four_parts() -> None:
    msg = make_message()
    frames = encode_zmq(msg, Signer(KEY))
    expected = hmac.new(
        KEY, msg.header + msg.parent_header + msg.metadata + msg.content, hashlib.sha256
    ).hexdigest()
    assert frames[1] == expected.encode()


def test_frames_may_be_bytearrays_or_memoryviews() -> None:
    signer = Signer(KEY)
    msg = make_message(buffers=[b"b"])
    frames: list[Any] = [memoryview(f) for f in encode_zmq(msg, signer, [b"id"])]
    frames[0] = bytearray(frames[0])
    idents, back = decode_zmq("shell", frames, signer)
    assert idents == [b"id"]
    assert type(idents[0]) is bytes
    assert back.buffers == [b"b"]
    assert type(back.buffers[0]) is bytes


@pytest.mark.parametrize("index", [2, 3, 4, 5])
def test_tampered_part_is_rejected(index: int) -> None:
    signer = Signer(KEY)
    frames = encode_zmq(make_message(content={"code": "1"}), signer)
    # frames: delimiter, signature, header, parent, metadata, content
    frames[index] = (
        frames[index].replace(b"}", b' ,"x":1}', 1) if frames[index] != b"{}" else b"{ }"
    )
    with pytest.raises(ProtocolError, match="signature is invalid"):
        decode_zmq("shell", frames, signer)


def test_tampered_signature_is_rejected() -> None:
    signer = Signer(KEY)
    frames = encode_zmq(make_message(), signer)
    frames[1] = frames[1][:-1] + (b"0" if frames[1][-1:] != b"0" else b"1")
    with pytest.raises(ProtocolError, match="signature is invalid"):
        decode_zmq("shell", frames, signer)


def test_wrong_key_is_rejected() -> None:
    frames = encode_zmq(make_message(), Signer(KEY))
    with pytest.raises(ProtocolError, match="wrong key"):
        decode_zmq("shell", frames, Signer(b"another key"))


def test_unsigned_message_is_rejected_when_a_key_is_set() -> None:
    frames = encode_zmq(make_message(), Signer(b""))
    assert frames[1] == b""
    with pytest.raises(ProtocolError, match="signature"):
        decode_zmq("shell", frames, Signer(KEY))


def test_empty_key_disables_signing() -> None:
    signer = Signer(b"")
    frames = encode_zmq(make_message(), signer)
    frames[1] = b"anything"
    _, msg = decode_zmq("shell", frames, signer)
    assert msg.msg_type == "execute_request"


def test_missing_delimiter() -> None:
    frames = encode_zmq(make_message(), Signer(KEY), [b"id"])
    frames.remove(DELIMITER)
    with pytest.raises(ProtocolError, match="no <IDS\\|MSG> delimiter"):
        decode_zmq("shell", frames, Signer(KEY))


@pytest.mark.parametrize("keep", [0, 1, 4])
def test_too_few_frames(keep: int) -> None:
    frames = encode_zmq(make_message(), Signer(KEY))
    truncated = frames[: 1 + keep]
    with pytest.raises(
        ProtocolError, match=f"has {keep} frames after the delimiter, expected >= 5"
    ):
        decode_zmq("shell", truncated, Signer(KEY))


def test_malformed_header_is_rejected_even_when_signed() -> None:
    signer = Signer(KEY)
    parts = [b'{"msg_type":"status"}', b"{}", b"{}", b"{}"]
    frames = [DELIMITER, signer.sign(parts), *parts]
    with pytest.raises(ProtocolError, match="no 'msg_id'"):
        decode_zmq("iopub", frames, signer)


def test_check_body_controls_content_parsing() -> None:
    signer = Signer(KEY)
    parts = [b'{"msg_id":"m","msg_type":"stream"}', b"{}", b"{}", b"[not an object"]
    frames = [DELIMITER, signer.sign(parts), *parts]
    _, msg = decode_zmq("iopub", frames, signer)  # trusted (signed) bodies are not parsed
    assert msg.content == parts[3]
    with pytest.raises(ProtocolError, match="content is not valid JSON"):
        decode_zmq("iopub", frames, signer, check_body=True)


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported signature scheme 'hmac-sha3'"):
        Signer(KEY, "hmac-sha3")


# -- cross-checks with jupyter_client ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha1", "hmac-md5"])
def test_session_message_decodes_with_our_signer(scheme: str) -> None:
    session = Session(key=KEY, signature_scheme=scheme)
    parent = session.msg("execute_request", content={"code": "x"})
    sent = session.msg(
        "execute_reply",
        content={"status": "ok", "execution_count": 3},
        parent=parent,
        metadata={"m": [1, 2]},
    )
    frames = session.serialize(sent, ident=[b"client-1"])
    frames.extend([b"buf0", b"buf1"])
    idents, msg = decode_zmq("shell", frames, Signer(KEY, scheme), check_body=True)
    assert idents == [b"client-1"]
    assert msg.msg_id == sent["header"]["msg_id"]
    assert msg.msg_type == "execute_reply"
    assert msg.parent_msg_id == parent["header"]["msg_id"]
    assert msg.content_dict == {"status": "ok", "execution_count": 3}
    assert msg.to_dict()["metadata"] == {"m": [1, 2]}
    assert msg.buffers == [b"buf0", b"buf1"]


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha1", "hmac-md5"])
def test_session_rejects_our_message_signed_with_another_key(scheme: str) -> None:
    session = Session(key=KEY, signature_scheme=scheme)
    frames = encode_zmq(make_message(), Signer(b"not the key", scheme))
    _, msg_list = session.feed_identities(frames)
    with pytest.raises(ValueError, match="Invalid Signature"):
        session.deserialize(msg_list)


@fast
@given(
    identities,
    st.sampled_from(["hmac-sha256", "hmac-sha1", "hmac-md5"]),
    json_objects,
    json_objects,
    buffers,
)
def test_our_message_is_accepted_by_session(
    idents: list[bytes],
    scheme: str,
    content: dict[str, Any],
    parent: dict[str, Any],
    bufs: list[bytes],
) -> None:
    session = Session(key=KEY, signature_scheme=scheme)
    msg = make_message("shell", "comm_msg", content, parent=parent, buffers=bufs)
    frames = encode_zmq(msg, Signer(KEY, scheme), idents)
    got_idents, msg_list = session.feed_identities(frames, copy=True)
    assert got_idents == idents
    theirs = session.deserialize(msg_list, content=True, copy=True)
    assert theirs["header"] == extract_dates(msg.header_dict)
    assert theirs["msg_id"] == msg.msg_id
    assert theirs["parent_header"] == extract_dates(parent)
    assert theirs["content"] == content
    assert [bytes(b) for b in theirs["buffers"]] == bufs


@fast
@given(identities, json_objects, buffers)
def test_session_serialised_message_decodes_with_our_signer(
    idents: list[bytes], content: dict[str, Any], bufs: list[bytes]
) -> None:
    session = Session(key=KEY)
    sent = session.msg("comm_msg", content=content)
    frames = session.serialize(sent, ident=idents or None)
    frames.extend(bufs)
    got_idents, msg = decode_zmq("iopub", frames, Signer(KEY), check_body=True)
    assert got_idents == idents
    assert msg.content_dict == content
    assert msg.buffers == bufs
    assert msg.header_dict["msg_id"] == sent["header"]["msg_id"]


def test_our_signature_matches_session_sign() -> None:
    session = Session(key=KEY)
    msg = make_message(content={"a": 1}, parent={"msg_id": "p"})
    parts = [msg.header, msg.parent_header, msg.metadata, msg.content]
    assert Signer(KEY).sign(parts) == session.sign(parts)
    assert dumps({"a": 1}) in parts
