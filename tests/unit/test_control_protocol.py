"""The typed gateway ↔ replica control protocol (``nbcluster.protocol._control``): each model
survives the wire, keeps the field names sent before the models existed, and malformed input
is rejected naming what is wrong, on both sides."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from nbcluster.gateway._control import control_request, replica_last_term
from nbcluster.kernel._kernel import ReplicaKernel
from nbcluster.protocol import (
    CONTROL_ERROR_ENAME,
    METADATA_KEY,
    YIELD_ENAME,
    CheckpointReply,
    CheckpointRequest,
    ControlErrorReply,
    ControlMessageError,
    DeviceMemory,
    EvictReply,
    EvictRequest,
    ExecuteMetadata,
    ExecutionYielded,
    LogStatus,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
    ReplicaInfo,
    RestorePoint,
    check_gpus,
    new_message,
    parse_execute_metadata,
    parse_reply,
    parse_request,
    read_device_memory,
    read_yielded,
)

from .fakes import make_kernel
from .strategies import fast, json_objects, json_values

# -- strategies -------------------------------------------------------------------------------

_names = st.text(min_size=1, max_size=12)
_addresses = st.builds(lambda h, p: f"{h}:{p}", _names, st.integers(1, 65535))
_counts = st.integers(min_value=0, max_value=2**40)
_timeouts = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
_logs = st.builds(
    lambda members, leader, term: LogStatus.model_validate(
        {"members": members, "leader": leader, "backend": "memory", "term": term}
    ),
    st.lists(_addresses, max_size=5),
    st.none() | _addresses,
    _counts,
)
_points = st.builds(
    RestorePoint,
    term=_counts,
    execution_count=_counts,
    checkpoint_created=st.none() | st.floats(min_value=0, max_value=4e9),
    later_cells=_counts,
    refused=st.lists(st.text(max_size=20), max_size=3),
)
_gpus = st.lists(st.integers(0, 64), unique=True, max_size=8).map(tuple)

MODELS: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    RaftStartRequest: st.builds(
        RaftStartRequest,
        address=_addresses,
        peers=st.lists(_addresses, min_size=1, max_size=5),
        members=st.integers(1, 9),
        timeout=_timeouts,
        restore=st.booleans(),
    ),
    RaftStartReply: st.builds(RaftStartReply, log=_logs, restored=st.none() | _points),
    MembershipRequest: st.builds(
        MembershipRequest,
        remove=st.lists(_addresses, max_size=3),
        add=st.lists(_addresses, max_size=3),
        timeout=_timeouts,
    ),
    MembershipReply: st.builds(MembershipReply, log=_logs),
    CheckpointRequest: st.builds(CheckpointRequest, after_term=_counts),
    CheckpointReply: st.builds(
        CheckpointReply,
        log=_logs,
        term=_counts,
        execution_count=_counts,
        created=st.floats(min_value=0, max_value=4e9),
        size=_counts,
    ),
    ControlErrorReply: st.builds(
        ControlErrorReply, ename=_names, evalue=st.text(max_size=40), traceback=st.lists(_names)
    ),
    # Fields left out rather than None: an explicit null binding is malformed.
    ExecuteMetadata: st.fixed_dictionaries(
        {},
        optional={
            "term": st.integers(1, 2**40),
            "attempt": st.integers(1, 9),
            "after_term": _counts,
            "gpus": _gpus,
        },
    ).map(lambda fields: ExecuteMetadata(**fields)),
    ExecutionYielded: st.builds(
        ExecutionYielded, winner=st.none() | _names, completed=st.booleans()
    ),
    ReplicaInfo: st.builds(
        ReplicaInfo,
        kernel_id=_names,
        replica_id=_names,
        replicated=st.booleans(),
        last_term=_counts,
    ),
    RestorePoint: _points,
}


def over_the_wire(model: BaseModel) -> Any:
    """What the other side gets: the JSON form, through the bytes of a message part."""
    return orjson.loads(orjson.dumps(model.model_dump(mode="json")))


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS), ids=lambda m: m.__name__)
@fast
@given(data=st.data())
def test_every_model_survives_the_wire(model: type[BaseModel], data: st.DataObject) -> None:
    sent = data.draw(MODELS[model])
    assert model.model_validate(over_the_wire(sent)) == sent


@fast
@given(sent=MODELS[ExecuteMetadata])
def test_execute_metadata_sends_only_what_is_set(sent: ExecuteMetadata) -> None:
    wire = orjson.loads(orjson.dumps(sent.dump()))
    assert None not in wire.values()
    assert parse_execute_metadata({"nbcluster": wire}) == sent


def test_the_field_names_are_those_sent_before_the_models() -> None:
    """The wire format did not change: the keys each side wrote and read as bare dicts."""
    start = RaftStartRequest(address="a:1", peers=["a:1", "b:2"], members=2, restore=True)
    assert start.model_dump(mode="json") == {
        "address": "a:1",
        "peers": ["a:1", "b:2"],
        "members": 2,
        "timeout": 10.0,
        "restore": True,
    }
    assert MembershipRequest(remove=["a:1"], add=["c:3"]).model_dump(mode="json") == {
        "remove": ["a:1"],
        "add": ["c:3"],
        "timeout": 20.0,
    }
    assert CheckpointRequest(after_term=4).model_dump(mode="json") == {"after_term": 4}
    assert ExecuteMetadata(term=2, attempt=1, after_term=1).dump() == {
        "term": 2,
        "attempt": 1,
        "after_term": 1,
    }
    assert ExecuteMetadata(gpus=(0, 2)).dump() == {"gpus": [0, 2]}
    log = {"members": ["a:1"], "leader": "a:1", "backend": "pysyncobj", "commit_index": 3}
    reply = RaftStartReply(
        log=LogStatus.model_validate(log),
        restored=RestorePoint(term=3, execution_count=2, checkpoint_created=None, later_cells=3),
    )
    assert reply.model_dump(mode="json") == {
        "status": "ok",
        "log": log,  # the backend's diagnostics are kept as they came
        "restored": {
            "term": 3,
            "execution_count": 2,
            "checkpoint_created": None,
            "later_cells": 3,
            "refused": [],  # added with signed state: objects a restore left out
        },
    }
    info = ReplicaInfo(kernel_id="k", replica_id="r1", replicated=True, last_term=7)
    assert info.model_dump(mode="json") == {
        "kernel_id": "k",
        "replica_id": "r1",
        "replicated": True,
        "last_term": 7,
    }


# -- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "content", "fragments"),
    [
        (RaftStartRequest, {"address": "a:1", "members": 3}, ["peers: Field required"]),
        (
            RaftStartRequest,
            {"address": "a:1", "peers": "a:1", "members": "three"},
            ["peers: Input should be a valid list", "members:", "(got 'three')"],
        ),
        (
            RaftStartRequest,
            {"address": "a:1", "peers": ["a:1"], "members": 1, "timeout": 0},
            ["timeout: Input should be greater than 0"],
        ),
        (MembershipRequest, {"remove": ["a"], "drop": ["b"]}, ["drop: Extra inputs"]),
        (MembershipRequest, {"add": [1]}, ["add.0: Input should be a valid string"]),
        (CheckpointRequest, {"after_term": -1}, ["after_term: Input should be greater than"]),
        (CheckpointRequest, None, ["content: Input should be a valid dictionary"]),
    ],
)
def test_a_malformed_request_is_named(
    model: type[RaftStartRequest | MembershipRequest | CheckpointRequest],
    content: Any,
    fragments: list[str],
) -> None:
    with pytest.raises(ControlMessageError) as caught:
        parse_request(model, content)
    text = str(caught.value)
    assert text.startswith(f"malformed {model.msg_type}: ")
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize(
    "model", [RaftStartRequest, MembershipRequest, CheckpointRequest, EvictRequest]
)
@fast
@given(content=json_objects | json_values)
def test_any_json_is_a_request_or_a_named_error(
    model: type[RaftStartRequest | MembershipRequest | CheckpointRequest | EvictRequest],
    content: Any,
) -> None:
    try:
        request = parse_request(model, content)
    except ControlMessageError as exc:
        assert str(exc).startswith(f"malformed {model.msg_type}: ")
        assert len(str(exc)) < 2000
    else:
        assert model.model_validate(over_the_wire(request)) == request


@pytest.mark.parametrize(
    "model",
    [RaftStartReply, MembershipReply, CheckpointReply, EvictReply],
    ids=lambda m: m.__name__,
)
@fast
@given(content=json_objects | json_values | st.builds(dict, status=st.just("error")))
def test_any_json_reply_is_read_or_becomes_an_error_reply(
    model: type[RaftStartReply | MembershipReply | CheckpointReply | EvictReply], content: Any
) -> None:
    read = parse_reply(model, content)
    assert isinstance(read, model | ControlErrorReply)
    if isinstance(read, ControlErrorReply) and read.ename == CONTROL_ERROR_ENAME:
        request = model.msg_type.removesuffix("_reply") + "_request"
        assert read.evalue.startswith(("malformed reply to", "malformed error reply to"))
        assert request in read.evalue


def test_reading_replies() -> None:
    ok = {"status": "ok", "log": {"members": ["a:1"]}}
    assert parse_reply(MembershipReply, ok) == MembershipReply(log=LogStatus(members=["a:1"]))
    failed = {"status": "error", "ename": "RuntimeError", "evalue": "no group", "traceback": []}
    assert parse_reply(MembershipReply, failed) == ControlErrorReply(
        ename="RuntimeError", evalue="no group"
    )
    broken = parse_reply(MembershipReply, {"status": "ok", "log": {"members": "a:1"}})
    assert isinstance(broken, ControlErrorReply)
    assert broken.ename == CONTROL_ERROR_ENAME
    assert broken.evalue.startswith("malformed reply to nbcluster_membership_request: ")
    assert "log.members: Input should be a valid list" in broken.evalue
    broken = parse_reply(RaftStartReply, {"status": "error"})
    assert isinstance(broken, ControlErrorReply)
    assert "malformed error reply to nbcluster_raft_start_request" in broken.evalue
    assert "ename: Field required" in broken.evalue


# -- execute metadata and related replies -----------------------------------------------------


@pytest.mark.parametrize("metadata", [None, {}, "x", {"nbcluster": None}, {"nbcluster": "x"}])
def test_a_request_without_nbcluster_metadata_has_none(metadata: Any) -> None:
    assert parse_execute_metadata(metadata) is None


def test_execute_metadata_is_checked() -> None:
    assert parse_execute_metadata({"nbcluster": {"term": 3, "client_key": 1}}) == ExecuteMetadata(
        term=3
    )
    with pytest.raises(ControlMessageError) as caught:
        parse_execute_metadata({"nbcluster": {"term": "3", "attempt": 0}})
    text = str(caught.value)
    assert text.startswith("malformed execute_request metadata nbcluster: ")
    assert "term: Input should be a valid integer (got '3')" in text
    assert "attempt: Input should be greater than or equal to 1" in text
    with pytest.raises(ControlMessageError, match=r"gpus: item 1 of \[0, -1\] is negative"):
        parse_execute_metadata({"nbcluster": {"term": 1, "gpus": [0, -1]}})
    # The replica reads the term without the binding (an invalid binding only warns).
    assert parse_execute_metadata(
        {"nbcluster": {"term": 1, "gpus": "0,1"}}, gpus=False
    ) == ExecuteMetadata(term=1)


@pytest.mark.parametrize("value", ["0,2", None, 3, [True], [1.0], [0, 0], [-1]])
def test_gpus_the_model_rejects_are_those_the_replica_rejects(value: Any) -> None:
    with pytest.raises(ValueError) as caught:
        check_gpus(value)
    with pytest.raises(ControlMessageError) as model_error:
        parse_execute_metadata({"nbcluster": {"gpus": value}})
    assert str(caught.value) in str(model_error.value)


def test_replica_term_metadata() -> None:
    """The replica runs a request as a plain cell unless the gateway sent a term."""
    term_of = ReplicaKernel._term_of
    assert term_of({"metadata": {}}) is None
    assert term_of({"metadata": {"nbcluster": {"gpus": [0], "attempt": "x"}}}) is None
    meta = term_of({"metadata": {"nbcluster": {"term": 4, "attempt": 2, "gpus": "bad"}}})
    assert meta == ExecuteMetadata(term=4, attempt=2)
    with pytest.raises(ControlMessageError, match="term"):
        term_of({"metadata": {"nbcluster": {"term": None}}})


def test_yield_fields_of_an_execute_reply() -> None:
    assert read_yielded({"status": "ok"}) is None
    assert read_yielded({"status": "error", "ename": "NameError"}) is None
    content = {"status": "error", "ename": YIELD_ENAME, "yielded": True, "winner": "r2"}
    assert read_yielded(content | {"completed": True}) == ExecutionYielded(
        winner="r2", completed=True
    )
    # A malformed one is read cautiously: the cell is taken as not completed.
    assert read_yielded(content | {"completed": "yes"}) == ExecutionYielded()


# -- fuzzing: mutated messages, and whatever else either side may receive ---------------------

#: Valid requests of every kind the gateway sends a replica.
REQUESTS: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    RaftStartRequest: MODELS[RaftStartRequest],
    MembershipRequest: MODELS[MembershipRequest],
    CheckpointRequest: MODELS[CheckpointRequest],
    EvictRequest: st.builds(
        EvictRequest,
        devices=st.lists(st.integers(0, 64), unique=True, max_size=4),
        reason=st.text(max_size=20),
    ),
}

_field_names = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)


@st.composite
def mutated_request(draw: st.DrawFn, model: type[BaseModel]) -> tuple[Any, str]:
    """A valid request's content with one field dropped, given any JSON value, or added;
    and that field's name."""
    content = over_the_wire(draw(REQUESTS[model]))
    how = draw(st.sampled_from(["drop", "retype", "add"]))
    field = draw(_field_names) if how == "add" else draw(st.sampled_from(sorted(content)))
    if how == "drop":
        content.pop(field)
    else:
        content[field] = draw(json_values)
    return content, field


@pytest.mark.parametrize("model", list(REQUESTS), ids=lambda m: m.__name__)
@fast
@given(data=st.data())
def test_a_mutated_request_is_read_or_the_field_is_named(
    model: type[RaftStartRequest | MembershipRequest | CheckpointRequest | EvictRequest],
    data: st.DataObject,
) -> None:
    content, field = data.draw(mutated_request(model))
    try:
        request = parse_request(model, content)
    except ControlMessageError as exc:
        assert str(exc).startswith(f"malformed {model.msg_type}: {field}"), str(exc)
    else:
        assert model.model_validate(over_the_wire(request)) == request


_metadata = (
    json_values
    | st.fixed_dictionaries({METADATA_KEY: json_objects | json_values})
    | st.fixed_dictionaries(
        {METADATA_KEY: st.fixed_dictionaries({"term": json_values}, optional={"gpus": json_values})}
    )
)


@fast
@given(metadata=_metadata)
def test_any_execute_metadata_is_read_or_named(metadata: Any) -> None:
    """What a replica finds in an execute request's metadata: nothing of nbcluster's, the
    fields, or a ``ControlMessageError`` naming them; never another exception."""
    for gpus in (True, False):
        try:
            read = parse_execute_metadata(metadata, gpus=gpus)
        except ControlMessageError as exc:
            assert str(exc).startswith(f"malformed execute_request metadata {METADATA_KEY}: ")
        else:
            assert read is None or isinstance(read, ExecuteMetadata)
    try:
        ReplicaKernel._term_of({"metadata": metadata})
    except ControlMessageError as exc:
        assert "term" in str(exc) or "attempt" in str(exc) or "after_term" in str(exc)


@fast
@given(
    content=json_values
    | st.fixed_dictionaries(
        {METADATA_KEY: st.fixed_dictionaries({DeviceMemory.key: json_objects | json_values})}
    )
    | json_objects
)
def test_what_the_gateway_reads_from_replies_never_raises(content: Any) -> None:
    """Device memory, yield fields and the last term, from whatever a replica answered."""
    memory = read_device_memory(content)
    assert memory is None or isinstance(memory, DeviceMemory)
    if isinstance(content, dict):
        assert read_yielded(content | {"ename": YIELD_ENAME}) is not None
        kernel, _ = make_kernel("r1")
        assert replica_last_term(kernel, {METADATA_KEY: content}) >= 0
        assert replica_last_term(kernel, content) >= 0


# -- the gateway side over a replica link -----------------------------------------------------


async def test_the_gateway_sends_models_and_reads_replies() -> None:
    kernel, links = make_kernel("r1", "r2")
    link = links["r1"]

    async def ask(answer: dict[str, Any]) -> MembershipReply | ControlErrorReply:
        request = MembershipRequest(remove=["a:1"])
        task = asyncio.create_task(
            control_request(kernel, link, "shell", request, MembershipReply, 5.0)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0)
        sent = link.sent[-1]
        assert (sent.channel, sent.msg_type) == ("shell", "nbcluster_membership_request")
        assert sent.content_dict == {"remove": ["a:1"], "add": [], "timeout": 20.0}
        kernel.on_replica_message(  # type: ignore[arg-type]
            link, new_message("shell", "nbcluster_membership_reply", answer, parent=sent)
        )
        return await task

    ok = await ask({"status": "ok", "log": {"members": ["b:2"], "leader": None}})
    assert isinstance(ok, MembershipReply) and ok.log.members == ["b:2"]
    failed = await ask({"status": "error", "ename": "RuntimeError", "evalue": "no group"})
    assert failed == ControlErrorReply(ename="RuntimeError", evalue="no group")
    malformed = await ask({"status": "ok"})
    assert isinstance(malformed, ControlErrorReply)
    assert "log: Field required" in malformed.evalue


def test_the_gateway_reads_the_last_term_from_kernel_info() -> None:
    kernel, _ = make_kernel("r1")
    block = {"kernel_id": "k", "replica_id": "r1", "replicated": True, "last_term": 9}
    assert replica_last_term(kernel, {"nbcluster": block}) == 9
    assert replica_last_term(kernel, {"implementation": "ipython"}) == 0  # not our kernel
    assert replica_last_term(kernel, {"nbcluster": block | {"last_term": "9"}}) == 0


# -- a real replica kernel answers malformed control requests and keeps serving --------------


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_replica_answers_malformed_control_requests_and_keeps_serving(tmp_path: Path) -> None:
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    connection_file = str(tmp_path / "kernel.json")
    write_connection_file(connection_file, ip="127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "nbcluster.kernel", "-f", connection_file],
        env=env | {"NBCLUSTER_KERNEL_ID": "k-test", "NBCLUSTER_REPLICA_ID": "r1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = BlockingKernelClient(connection_file=connection_file)
    client.load_connection_file()
    # A busy machine can delay the new kernel's heartbeat past jupyter_client's 1 s, which
    # wait_for_ready takes for a dead kernel.
    client.hb_channel.time_to_dead = 30.0
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)

        def ask(channel: str, msg_type: str, content: Any) -> dict[str, Any]:
            msg = client.session.msg(msg_type, content)
            getattr(client, f"{channel}_channel").send(msg)
            while True:
                reply: dict[str, Any] = getattr(client, f"get_{channel}_msg")(timeout=30)
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    assert reply["msg_type"] == msg_type.replace("_request", "_reply")
                    return dict(reply["content"])

        malformed = [
            ("shell", RaftStartRequest.msg_type, {"address": "127.0.0.1:1"}, "peers: Field"),
            ("shell", MembershipRequest.msg_type, {"remove": "a:1"}, "remove: Input should"),
            ("shell", MembershipRequest.msg_type, {"bogus": 1}, "bogus: Extra inputs"),
            ("control", CheckpointRequest.msg_type, {"after_term": "x"}, "after_term:"),
        ]
        for channel, msg_type, content, fragment in malformed:
            reply = ask(channel, msg_type, content)
            error = ControlErrorReply.model_validate(reply)
            assert error.ename == CONTROL_ERROR_ENAME
            assert error.evalue.startswith(f"malformed {msg_type}: ")
            assert fragment in error.evalue
        # A well-formed request this replica cannot serve fails as before: with the reason.
        reply = ask("shell", MembershipRequest.msg_type, MembershipRequest().model_dump())
        assert reply["ename"] == "RuntimeError" and "not in a replica group" in reply["evalue"]
        # Still serving: kernel_info carries the typed nbcluster block, cells run.
        info = ask("shell", "kernel_info_request", {})
        assert ReplicaInfo.model_validate(info["nbcluster"]) == ReplicaInfo(
            kernel_id="k-test", replica_id="r1", replicated=False, last_term=0
        )
        executed = ask("shell", "execute_request", {"code": "1 + 1", "silent": False})
        assert executed["status"] == "ok"
        assert process.poll() is None
    finally:
        client.stop_channels()
        process.kill()
        process.wait(10)
