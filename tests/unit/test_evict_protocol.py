"""GPU memory in the control protocol: ``nbcluster_evict_request`` / ``EvictReply`` and the
``device_memory`` piece of an execute reply; and a real replica kernel serving them (without a
GPU: nothing to free, but the whole path)."""

from __future__ import annotations

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

from nbcluster.protocol import (
    CONTROL_ERROR_ENAME,
    ControlErrorReply,
    ControlMessageError,
    DeviceMemory,
    EvictReply,
    EvictRequest,
    parse_reply,
    parse_request,
    read_device_memory,
)

from .strategies import fast, json_objects

MODELS: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    EvictRequest: st.builds(
        EvictRequest,
        devices=st.lists(st.integers(0, 64), unique=True, max_size=8),
        reason=st.text(max_size=40),
    ),
    EvictReply: st.builds(
        EvictReply,
        freed_bytes=st.integers(0, 2**50),
        moved_objects=st.integers(0, 10**6),
        seconds=st.floats(0, 1e5, allow_nan=False),
    ),
    DeviceMemory: st.builds(
        DeviceMemory,
        held=st.dictionaries(st.integers(0, 64).map(str), st.integers(0, 2**50), max_size=8),
    ),
}


def over_the_wire(model: BaseModel) -> Any:
    return orjson.loads(orjson.dumps(model.model_dump(mode="json")))


@pytest.mark.parametrize("model", list(MODELS), ids=lambda m: m.__name__)
@fast
@given(data=st.data())
def test_every_model_survives_the_wire(model: type[BaseModel], data: st.DataObject) -> None:
    sent = data.draw(MODELS[model])
    assert model.model_validate(over_the_wire(sent)) == sent


def test_the_wire_format() -> None:
    assert (EvictRequest.msg_type, EvictRequest.reply_type) == (
        "nbcluster_evict_request",
        "nbcluster_evict_reply",
    )
    assert EvictRequest(devices=[0, 3], reason="GPU 0 goes to k2").model_dump(mode="json") == {
        "devices": [0, 3],
        "reason": "GPU 0 goes to k2",
    }
    reply = EvictReply(freed_bytes=10, moved_objects=2, seconds=0.5)
    assert reply.model_dump(mode="json") == {
        "status": "ok",
        "freed_bytes": 10,
        "moved_objects": 2,
        "seconds": 0.5,
    }
    assert DeviceMemory(held={"1": 5}).model_dump(mode="json") == {"held": {"1": 5}}
    assert DeviceMemory.key == "device_memory"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({}, "devices: Field required"),
        ({"devices": "0"}, "devices: Input should be a valid list"),
        ({"devices": [0, -1]}, "devices.1: Input should be greater than or equal to 0"),
        ({"devices": ["0"]}, "devices.0: Input should be a valid integer"),
        ({"devices": [1, 1]}, "devices: a device appears more than once in [1, 1]"),
        ({"devices": [], "reason": 3}, "reason: Input should be a valid string"),
        ({"devices": [], "force": True}, "force: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_evict_request_is_named(content: Any, fragment: str) -> None:
    with pytest.raises(ControlMessageError) as caught:
        parse_request(EvictRequest, content)
    assert str(caught.value).startswith("malformed nbcluster_evict_request: ")
    assert fragment in str(caught.value)


@fast
@given(content=json_objects)
def test_any_json_is_an_evict_request_or_a_named_error(content: dict[str, Any]) -> None:
    try:
        request = parse_request(EvictRequest, content)
    except ControlMessageError as exc:
        assert str(exc).startswith("malformed nbcluster_evict_request: ")
    else:
        assert EvictRequest.model_validate(over_the_wire(request)) == request


def test_reading_evict_replies() -> None:
    ok = {"status": "ok", "freed_bytes": 7, "moved_objects": 1, "seconds": 0.25}
    assert parse_reply(EvictReply, ok) == EvictReply(freed_bytes=7, moved_objects=1, seconds=0.25)
    for broken, fragment in [
        (ok | {"freed_bytes": -1}, "freed_bytes: Input should be greater than or equal to 0"),
        (ok | {"moved_objects": "1"}, "moved_objects: Input should be a valid integer"),
        ({"status": "ok", "freed_bytes": 0}, "moved_objects: Field required"),
    ]:
        read = parse_reply(EvictReply, broken)
        assert isinstance(read, ControlErrorReply) and read.ename == CONTROL_ERROR_ENAME
        assert read.evalue.startswith("malformed reply to nbcluster_evict_request: ")
        assert fragment in read.evalue
    busy = {"status": "error", "ename": "DeviceBusyError", "evalue": "GPU 0 is bound"}
    assert parse_reply(EvictReply, busy) == ControlErrorReply(
        ename="DeviceBusyError", evalue="GPU 0 is bound"
    )


@pytest.mark.parametrize(
    "held",
    [{"x": 1}, {"01": 1}, {"-1": 1}, {"0": -5}, {"0": True}, {"0": 1.5}, {"0": "3"}, [], None],
)
def test_malformed_device_memory_is_refused_and_read_as_nothing(held: Any) -> None:
    with pytest.raises(ValueError, match="held"):
        DeviceMemory.model_validate({"held": held})
    assert (
        read_device_memory({"status": "ok", "nbcluster": {"device_memory": {"held": held}}}) is None
    )


def test_reading_device_memory_from_an_execute_reply() -> None:
    content = {"status": "ok", "nbcluster": {"device_memory": {"held": {"0": 10, "3": 0}}}}
    assert read_device_memory(content) == DeviceMemory(held={"0": 10, "3": 0})
    assert read_device_memory({"status": "ok"}) is None
    assert read_device_memory({"status": "ok", "nbcluster": {}}) is None
    assert read_device_memory({"status": "ok", "nbcluster": "x"}) is None
    assert read_device_memory(None) is None


# -- a real replica kernel ----------------------------------------------------------------------

#: A cell that gives the kernel the fake device layer of ``test_device_memory`` and puts
#: ``t`` (4000 bytes) "on GPU 0".
FAKE_LAYER = """
from nbcluster.kernel._device_memory import NamespaceDeviceMemory
from nbcluster.kernel._device_torch import TorchFramework

class FakeDevices:
    def __init__(self):
        self.where, self.keep, self.moves = {}, [], []
    def in_use(self):
        return True
    def device_of(self, storage):
        return self.where.get(storage.data_ptr())
    def copy(self, storage, device):
        copy = storage.clone()
        self.keep.append(copy)
        self.where[copy.data_ptr()] = device
        self.moves.append((self.device_of(storage), device, storage.nbytes()))
        return copy
    def release_cached(self):
        pass

fake = FakeDevices()
kernel = get_ipython().kernel
kernel.device_memory = NamespaceDeviceMemory(
    kernel._namespace_values, lambda: [TorchFramework(torch, fake)]
)
t = torch.ones(1000)
fake.keep.append(t.untyped_storage())
fake.where[t.untyped_storage().data_ptr()] = 0
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_replica_evicts_on_control_and_reports_device_memory(tmp_path: Path) -> None:
    from jupyter_client.blocking import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    connection_file = str(tmp_path / "kernel.json")
    write_connection_file(connection_file, ip="127.0.0.1")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NBCLUSTER_") and k != "CUDA_VISIBLE_DEVICES"
    }
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

        def send(channel: str, msg_type: str, content: Any, metadata: Any = None) -> str:
            msg = client.session.msg(msg_type, content, metadata=metadata or {})
            getattr(client, f"{channel}_channel").send(msg)
            return str(msg["header"]["msg_id"])

        def reply_to(channel: str, msg_id: str) -> dict[str, Any]:
            while True:
                reply: dict[str, Any] = getattr(client, f"get_{channel}_msg")(timeout=60)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return dict(reply["content"])

        def ask(channel: str, msg_type: str, content: Any, metadata: Any = None) -> dict[str, Any]:
            return reply_to(channel, send(channel, msg_type, content, metadata))

        def execute(code: str, metadata: Any = None) -> dict[str, Any]:
            content = {"code": code, "silent": False}
            return ask("shell", "execute_request", content, metadata)

        evict = EvictRequest(devices=[], reason="test").model_dump(mode="json")
        # No GPU framework imported yet: no device_memory in the reply; nothing to evict.
        plain = execute("x = 1 + 1")
        assert plain["status"] == "ok" and "device_memory" not in plain.get("nbcluster", {})
        done = parse_reply(EvictReply, ask("control", EvictRequest.msg_type, evict))
        assert isinstance(done, EvictReply) and (done.freed_bytes, done.moved_objects) == (0, 0)
        # Malformed: named, and the replica keeps serving.
        error = ControlErrorReply.model_validate(
            ask("control", EvictRequest.msg_type, {"devices": [0, 0]})
        )
        assert error.ename == CONTROL_ERROR_ENAME and "more than once" in error.evalue

        # Once torch is imported, every reply of a cell says what the namespace holds: on this
        # machine without a GPU, nothing.
        with_torch = execute("import torch\nt = torch.ones(1000)")
        assert with_torch["status"] == "ok", with_torch
        assert read_device_memory(with_torch) == DeviceMemory(held={})

        # A cell bound to GPU 0 is running (it blocks on a FIFO until the test writes to it):
        # evicting GPU 0 is refused, GPU 1 is not.
        fifo = tmp_path / "go"
        os.mkfifo(fifo)
        running = send(
            "shell",
            "execute_request",
            {"code": f"got = open({str(fifo)!r}).read()", "silent": False},
            {"nbcluster": {"gpus": [0]}},
        )
        # (Started once its execute_input is out.)
        while True:
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == running and msg["msg_type"] == "execute_input":
                break
        refused = ControlErrorReply.model_validate(
            ask("control", EvictRequest.msg_type, {"devices": [0], "reason": "k2"})
        )
        assert refused.ename == "DeviceBusyError"
        assert "GPU 0 is bound to the cell running now" in refused.evalue
        other = parse_reply(EvictReply, ask("control", EvictRequest.msg_type, {"devices": [1]}))
        assert isinstance(other, EvictReply)
        with open(fifo, "w") as writer:
            writer.write("go")
        finished = reply_to("shell", running)
        assert finished["status"] == "ok" and read_device_memory(finished) == DeviceMemory(held={})
        assert execute("assert got == 'go'")["status"] == "ok"
        # After the cell, its device may be evicted again.
        again = parse_reply(EvictReply, ask("control", EvictRequest.msg_type, {"devices": [0]}))
        assert isinstance(again, EvictReply)

        # The kernel's own hooks end to end, with the fake device layer of the unit tests put in
        # the kernel from a cell: t "on GPU 0" is evicted on control and moved onto GPU 1 by
        # the next cell bound to it, which says so.
        setup = execute(FAKE_LAYER)
        assert setup["status"] == "ok", setup
        assert read_device_memory(setup) == DeviceMemory(held={"0": 4000})
        freed = parse_reply(EvictReply, ask("control", EvictRequest.msg_type, {"devices": [0]}))
        assert isinstance(freed, EvictReply)
        assert (freed.freed_bytes, freed.moved_objects) == (4000, 1)
        msg_id = send(
            "shell",
            "execute_request",
            {"code": "print(float(t.sum()), fake.moves)", "silent": False},
            {"nbcluster": {"gpus": [1]}},
        )
        streams = {"stdout": "", "stderr": ""}
        while True:
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                streams[msg["content"]["name"]] += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        moved = reply_to("shell", msg_id)
        assert moved["status"] == "ok"
        assert read_device_memory(moved) == DeviceMemory(held={"1": 4000})
        assert streams["stdout"].strip() == "1000.0 [(0, None, 4000), (None, 1, 4000)]"
        assert streams["stderr"].startswith("[nbcluster] moved 4.0 kB of tensors to GPU 1 in ")
        assert process.poll() is None
    finally:
        client.stop_channels()
        process.kill()
        process.wait(10)
