"""Hypothesis on what a real replica receives from the gateway (issue 13, "Fuzzing in the
suite"): control requests with any JSON content or a mutated valid one, on the channel each
goes on, and execute requests with any ``nbcluster`` metadata.

Each is answered, on its own reply type: a malformed request with a ``ControlMessageError``
whose text is the one ``parse_request`` gives (naming the message and the field), a valid one
with its ``ok`` reply or an error with its reason (a replica of no group cannot change members);
an execute request with a status. The replica never dies and, at the end, still answers
``kernel_info`` and runs a cell. ``tests/unit/test_control_protocol.py`` fuzzes the models
alone; this sends the messages to the process.

Bounded: ``NBCLUSTER_FUZZ_EXAMPLES`` (default 10) times 5 examples per test, derandomized.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

from nbcluster.protocol import (
    CONTROL_ERROR_ENAME,
    METADATA_KEY,
    CheckpointReply,
    CheckpointRequest,
    ControlErrorReply,
    ControlMessageError,
    EvictReply,
    EvictRequest,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
    parse_reply,
    parse_request,
)

from ..fuzz import fuzz_settings
from ..unit.strategies import json_objects, json_values
from ..unit.test_control_protocol import mutated_request

pytestmark = pytest.mark.integration

#: Each request, its channel and its ``ok`` reply.
ROUTES: dict[type[Any], tuple[str, type[Any]]] = {
    RaftStartRequest: ("shell", RaftStartReply),
    MembershipRequest: ("shell", MembershipReply),
    CheckpointRequest: ("control", CheckpointReply),
    EvictRequest: ("control", EvictReply),
}


class Replica:
    """A replica kernel process (``python -m nbcluster.kernel``) and a client of its sockets."""

    def __init__(self, tmp_path: Path) -> None:
        from jupyter_client.blocking import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        connection_file = str(tmp_path / "kernel.json")
        write_connection_file(connection_file, ip="127.0.0.1")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nbcluster.kernel", "-f", connection_file],
            env=env | {"NBCLUSTER_KERNEL_ID": "k-fuzz", "NBCLUSTER_REPLICA_ID": "r1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = BlockingKernelClient(connection_file=connection_file)
        self.client.load_connection_file()
        self.client.start_channels()
        self._wait_for_ready(60)

    def _wait_for_ready(self, timeout: float) -> None:
        """Until the kernel answers ``kernel_info``, while its process lives. (jupyter_client's
        ``wait_for_ready`` gives up on a kernel whose heartbeat misses one second, as a
        starting kernel's did on a loaded CI machine.)"""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the kernel exited ({self.process.returncode})"
            assert time.monotonic() < deadline, f"no kernel_info_reply in {timeout} s"
            msg_id = self.client.kernel_info()
            try:
                while True:
                    reply = self.client.get_shell_msg(timeout=1)
                    if reply["parent_header"].get("msg_id") == msg_id:
                        return
            except queue.Empty:
                continue

    def ask(
        self, channel: str, msg_type: str, content: Any, metadata: Any = None
    ) -> dict[str, Any]:
        """Send a request and return its reply (type and content). ``content`` goes as its
        JSON text: any JSON value, as a sender other than jupyter_client could send."""
        msg = self.client.session.msg(msg_type, json.dumps(content))
        if metadata is not None:
            msg["metadata"] = metadata  # any JSON value, as a client may send
        getattr(self.client, f"{channel}_channel").send(msg)
        while True:
            reply: dict[str, Any] = getattr(self.client, f"get_{channel}_msg")(timeout=30)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply

    def close(self) -> None:
        self.client.stop_channels()
        self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    r = Replica(tmp_path_factory.mktemp("fuzz-replica"))
    try:
        yield r
        # Still serving after everything it was sent.
        assert r.process.poll() is None
        info = r.ask("shell", "kernel_info_request", {})
        assert info["content"][METADATA_KEY]["replica_id"] == "r1"
        executed = r.ask("shell", "execute_request", {"code": "6 * 7", "silent": False})
        assert executed["content"]["status"] == "ok"
    finally:
        r.close()


@st.composite
def control_requests(draw: st.DrawFn) -> tuple[type[Any], Any]:
    model = draw(st.sampled_from(list(ROUTES)))
    content = draw(
        json_values | json_objects | mutated_request(model).map(lambda mutated: mutated[0])
    )
    return model, content


@pytest.mark.timeout(600)
def test_control_requests(replica: Replica) -> None:
    @fuzz_settings
    @given(request=control_requests())
    def send(request: tuple[type[Any], Any]) -> None:
        model, content = request
        note(f"{model.msg_type}: {content!r}")
        try:
            expected: ControlMessageError | None = None
            parse_request(model, content)
        except ControlMessageError as exc:
            expected = exc
        # A valid request to form a group would start Raft on a made-up address and wait for
        # peers that do not exist (the integration tests form real groups).
        assume(expected is not None or model is not RaftStartRequest)
        channel, ok_model = ROUTES[model]
        reply = replica.ask(channel, model.msg_type, content)
        assert reply["msg_type"] == model.reply_type
        read = parse_reply(ok_model, reply["content"])
        if expected is not None:
            assert read == ControlErrorReply(ename=CONTROL_ERROR_ENAME, evalue=str(expected))
        elif isinstance(read, ControlErrorReply):
            # Valid, but not for a replica of no group: the reason, not a malformed reply.
            assert read.ename != CONTROL_ERROR_ENAME and read.evalue, read
        assert replica.process.poll() is None

    send()


@pytest.mark.timeout(600)
def test_execute_metadata(replica: Replica) -> None:
    # An object, always: the gateway refuses any other metadata from a client
    # (``Message.from_parts``), and ipykernel drops such a message unanswered ("Got bad msg").
    metadata = json_objects | st.fixed_dictionaries(
        {METADATA_KEY: json_objects | json_values | st.fixed_dictionaries({"term": json_values})}
    )

    @fuzz_settings
    @given(metadata=metadata)
    def send(metadata: Any) -> None:
        note(repr(metadata))
        reply = replica.ask(
            "shell", "execute_request", {"code": "1 + 1", "silent": False}, metadata=metadata
        )
        assert reply["msg_type"] == "execute_reply"
        assert reply["content"]["status"] in ("ok", "error"), reply["content"]
        if reply["content"]["status"] == "error":
            assert reply["content"]["ename"] == CONTROL_ERROR_ENAME, reply["content"]
        assert replica.process.poll() is None

    send()
