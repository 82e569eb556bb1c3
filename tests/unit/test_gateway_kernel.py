"""GatewayKernel routing between websocket clients and replica links, with fakes for both."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from nbcluster.gateway import GatewayKernel, KernelRecord, KernelUnavailable, error_replies
from nbcluster.gateway._repair import RepairStatus
from nbcluster.protocol import Message, new_message

from .fakes import FakeClient, make_kernel


def execute_request(code: str = "1 + 1") -> Message:
    return new_message("shell", "execute_request", {"code": code, "silent": False}, session="c")


def reply_to(
    request: Message, msg_type: str, content: dict[str, Any], channel: str = ""
) -> Message:
    return new_message(channel or request.channel, msg_type, content, parent=request)


def status(state: str, parent: Message | None = None) -> Message:
    return new_message("iopub", "status", {"execution_state": state}, parent=parent)


# -- client to replica ------------------------------------------------------------------------


def test_client_request_reaches_the_executor_link() -> None:
    kernel, links = make_kernel("r1", "r2")
    client = FakeClient()
    kernel.attach(client)
    request = new_message("shell", "complete_request", {"code": "pri", "cursor_pos": 3})
    kernel.handle_client_message(client, request)
    assert links["r1"].sent == [request]
    assert links["r2"].sent == []
    assert len(kernel.pending) == 1
    assert client.sent == []


def test_with_several_replicas_execute_goes_to_the_target_only_with_its_term() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    first, second = execute_request("a = 1"), execute_request("a + 1")
    kernel.handle_client_message(client, first)
    [executed] = links["r1"].sent
    assert executed.msg_id == first.msg_id
    assert orjson.loads(executed.metadata)["nbcluster"] == {
        "term": 1,
        "attempt": 1,
        "after_term": 0,
    }
    assert links["r2"].sent == [] and links["r3"].sent == []
    # standby replicas' iopub never reaches the client; the executor's does
    kernel.on_replica_message(links["r2"], status("busy"))  # type: ignore[arg-type]
    assert client.sent == []
    kernel.on_replica_message(links["r1"], status("busy", first))  # type: ignore[arg-type]
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r1"], reply_to(first, "execute_reply", {"status": "ok", "execution_count": 1})
    )
    assert client.types() == [("iopub", "status"), ("shell", "execute_reply")]
    assert len(kernel.pending) == 0
    # the next cell is term 2 and must see term 1's state
    kernel.handle_client_message(client, second)
    meta = orjson.loads(links["r1"].sent[-1].metadata)["nbcluster"]
    assert meta == {"term": 2, "attempt": 1, "after_term": 1}


def test_a_cell_of_a_lost_executor_is_sent_to_another_replica_as_the_next_attempt() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    request = execute_request("x = 1")
    kernel.handle_client_message(client, request)
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "host h0 was lost")
    [retried] = links["r2"].sent
    assert retried.msg_id == request.msg_id
    assert orjson.loads(retried.metadata)["nbcluster"] == {"term": 1, "attempt": 2, "after_term": 0}
    assert client.sent == []  # nothing lost so far: the cell just runs elsewhere
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r2"], reply_to(request, "execute_reply", {"status": "ok", "execution_count": 1})
    )
    assert client.types() == [("shell", "execute_reply")]
    assert not kernel.is_dead


def test_a_retried_cell_that_the_lost_replica_had_won_is_answered_replica_lost() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    kernel.record.replicas[0].state, kernel.record.replicas[0].reason = "dead", "host h0 was lost"
    client = FakeClient()
    kernel.attach(client)
    request = execute_request("import time; time.sleep(60)")
    kernel.handle_client_message(client, request)
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "host h0 was lost")
    yielded = {"status": "error", "ename": "ExecutionYieldError", "evalue": "r1 did"}
    kernel.on_replica_message(links["r2"], reply_to(request, "execute_reply", yielded))  # type: ignore[arg-type]
    assert [m.msg_type for m in client.sent] == ["error", "execute_reply", "status"]
    reply = client.sent[1].content_dict
    assert reply["ename"] == "ReplicaLost" and "host h0 was lost" in reply["evalue"]


def test_a_lost_replica_that_replied_but_never_went_idle_gets_its_idle() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    request = execute_request()
    kernel.handle_client_message(client, request)
    kernel.on_replica_message(links["r1"], status("busy", request))  # type: ignore[arg-type]
    kernel.on_replica_message(  # type: ignore[arg-type]
        links["r1"], reply_to(request, "execute_reply", {"status": "ok", "execution_count": 1})
    )
    assert kernel.execution_state == "busy"
    client.sent.clear()
    kernel.drop_link("r1")
    kernel.on_replica_lost("r1", "replica r1 exited with code -9")
    assert [(m.msg_type, m.parent_msg_id) for m in client.sent] == [("status", request.msg_id)]
    assert client.sent[0].content_dict["execution_state"] == "idle"
    assert kernel.execution_state == "idle"
    assert links["r2"].sent == []  # the cell completed: it is not run again


def test_non_request_messages_are_forwarded_but_not_tracked() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    comm = new_message("shell", "comm_msg", {"comm_id": "c", "data": {}})
    answer = new_message("stdin", "input_reply", {"value": "x"})
    kernel.handle_client_message(client, comm)
    kernel.handle_client_message(client, answer)
    assert links["r1"].sent == [comm, answer]
    assert len(kernel.pending) == 0


def test_routing_callbacks_count_both_directions() -> None:
    routed: list[tuple[str, str]] = []
    kernel, links = make_kernel("r1", on_routed=lambda c, d: routed.append((c, d)))
    client = FakeClient()
    kernel.attach(client)
    request = execute_request()
    kernel.handle_client_message(client, request)
    kernel.on_replica_message(links["r1"], status("busy", request))  # type: ignore[arg-type]
    kernel.on_replica_message(links["r1"], reply_to(request, "execute_reply", {}))  # type: ignore[arg-type]
    assert routed == [("shell", "in"), ("iopub", "out"), ("shell", "out")]


def test_executor_falls_back_to_a_running_replica() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    kernel.record.replicas[0].state = "dead"
    kernel.record.replicas[1].state = "stopped"
    kernel.drop_link("r1")  # the last executor is gone
    assert kernel.executor is None
    assert kernel.executor_link() is links["r3"]
    assert kernel.executor == "r3"
    kernel.drop_link("r3")
    assert links["r3"].closed
    assert kernel.executor is None
    assert kernel.executor_link() is None


# -- replica to clients -----------------------------------------------------------------------


def test_reply_reaches_only_the_requesting_client() -> None:
    kernel, links = make_kernel("r1")
    alice, bob = FakeClient("alice"), FakeClient("bob")
    kernel.attach(alice)
    kernel.attach(bob)
    request = execute_request()
    kernel.handle_client_message(alice, request)

    reply = reply_to(request, "execute_reply", {"status": "ok", "execution_count": 1})
    kernel.on_replica_message(links["r1"], reply)  # type: ignore[arg-type]
    assert alice.sent == [reply]
    assert bob.sent == []
    assert len(kernel.pending) == 0
    # a second reply to the same request has no owner any more
    kernel.on_replica_message(links["r1"], reply)  # type: ignore[arg-type]
    assert alice.sent == [reply]


def test_input_request_goes_to_the_owner_and_keeps_the_request_open() -> None:
    kernel, links = make_kernel("r1")
    alice, bob = FakeClient("alice"), FakeClient("bob")
    kernel.attach(alice)
    kernel.attach(bob)
    request = execute_request("input()")
    kernel.handle_client_message(alice, request)
    prompt = reply_to(request, "input_request", {"prompt": "? ", "password": False}, "stdin")
    kernel.on_replica_message(links["r1"], prompt)  # type: ignore[arg-type]
    assert alice.sent == [prompt]
    assert len(kernel.pending) == 1
    reply = reply_to(request, "execute_reply", {"status": "ok"})
    kernel.on_replica_message(links["r1"], reply)  # type: ignore[arg-type]
    assert alice.sent == [prompt, reply]
    assert bob.sent == []
    assert len(kernel.pending) == 0


def test_iopub_reaches_every_client() -> None:
    kernel, links = make_kernel("r1")
    clients = [FakeClient(str(i)) for i in range(3)]
    for c in clients:
        kernel.attach(c)
    request = execute_request()
    kernel.handle_client_message(clients[0], request)
    stream = new_message("iopub", "stream", {"name": "stdout", "text": "hi"}, parent=request)
    kernel.on_replica_message(links["r1"], stream)  # type: ignore[arg-type]
    for c in clients:
        assert c.sent == [stream]


def test_iopub_welcome_is_not_forwarded() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.on_replica_message(links["r1"], new_message("iopub", "iopub_welcome", {}))  # type: ignore[arg-type]
    assert client.sent == []


def test_status_messages_update_execution_state() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    link: Any = links["r1"]
    kernel.on_replica_message(link, status("busy"))
    assert kernel.execution_state == "busy"
    kernel.on_replica_message(link, status("idle"))
    assert kernel.execution_state == "idle"
    # A replica's own 'starting' is not forwarded: the gateway announces lifecycle states.
    kernel.on_replica_message(link, status("starting"))
    assert kernel.execution_state == "idle"
    kernel.on_replica_message(link, status("bogus"))
    assert kernel.execution_state == "idle"
    assert [m.content_dict["execution_state"] for m in client.sent] == ["busy", "idle", "bogus"]
    assert kernel.model()["execution_state"] == "idle"


@pytest.mark.parametrize("lifecycle", ["dead", "restarting"])
def test_replica_status_does_not_override_a_lifecycle_state(lifecycle: str) -> None:
    kernel, links = make_kernel("r1")
    kernel.set_state(lifecycle)
    kernel.on_replica_message(links["r1"], status("idle"))  # type: ignore[arg-type]
    assert kernel.execution_state == lifecycle


def test_execute_input_updates_execution_count() -> None:
    kernel, links = make_kernel("r1")
    link: Any = links["r1"]
    kernel.on_replica_message(link, new_message("iopub", "execute_input", {"execution_count": 7}))
    assert kernel.execution_count == 7
    kernel.on_replica_message(link, new_message("iopub", "execute_input", {"code": "x"}))
    assert kernel.execution_count == 7


def test_reply_without_owner_is_dropped() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    orphan = new_message("shell", "execute_reply", {"status": "ok"}, parent={"msg_id": "nope"})
    kernel.on_replica_message(links["r1"], orphan)  # type: ignore[arg-type]
    no_parent = new_message("shell", "execute_reply", {"status": "ok"})
    kernel.on_replica_message(links["r1"], no_parent)  # type: ignore[arg-type]
    assert client.sent == []


def test_detached_client_gets_no_reply_and_its_requests_are_forgotten() -> None:
    kernel, links = make_kernel("r1")
    alice, bob = FakeClient("alice"), FakeClient("bob")
    kernel.attach(alice)
    kernel.attach(bob)
    request = execute_request()
    kernel.handle_client_message(alice, request)
    kernel.detach(alice)
    assert len(kernel.pending) == 0
    assert kernel.model()["connections"] == 1
    kernel.on_replica_message(links["r1"], reply_to(request, "execute_reply", {}))  # type: ignore[arg-type]
    kernel.on_replica_message(links["r1"], status("idle", request))  # type: ignore[arg-type]
    assert alice.sent == []
    assert bob.types() == [("iopub", "status")]


def test_reply_to_a_client_that_never_attached_is_not_sent() -> None:
    kernel, links = make_kernel("r1")
    stranger = FakeClient()
    request = execute_request()
    kernel.handle_client_message(stranger, request)
    kernel.on_replica_message(links["r1"], reply_to(request, "execute_reply", {}))  # type: ignore[arg-type]
    assert stranger.sent == []
    assert len(kernel.pending) == 0


# -- refusals ---------------------------------------------------------------------------------


def _parent_id(msg: Message) -> str | None:
    return orjson.loads(msg.parent_header).get("msg_id")


def test_dead_kernel_answers_an_execute_request_at_once() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.mark_dead("replica r1 on host h0 exited with code -9")
    client.sent.clear()

    request = execute_request()
    kernel.handle_client_message(client, request)
    assert links["r1"].sent == []
    assert client.types() == [
        ("iopub", "error"),
        ("shell", "execute_reply"),
        ("iopub", "status"),
        ("iopub", "status"),
    ]
    error, reply, idle, dead = client.sent
    for msg in (error, reply, idle):
        assert msg.parent_header == request.header
        assert msg.parent_msg_id == request.msg_id
    assert error.content_dict["ename"] == "KernelDead"
    assert "exited with code -9" in error.content_dict["evalue"]
    assert reply.content_dict["status"] == "error"
    assert reply.content_dict["ename"] == "KernelDead"
    assert reply.content_dict["execution_count"] is None
    assert "Restart it" in reply.content_dict["evalue"]
    assert reply.content_dict["traceback"]
    assert idle.content_dict == {"execution_state": "idle"}
    assert dead.content_dict == {"execution_state": "dead"}
    assert dead.parent_msg_id is None
    assert len(kernel.pending) == 0


def test_restart_holds_at_most_a_bounded_number_of_messages() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.begin_restart()
    requests = [new_message("shell", "kernel_info_request", {}) for _ in range(1001)]
    for request in requests:
        kernel.handle_client_message(client, request)
    assert links["r1"].sent == []
    # the 1001st is refused at once, saying why
    assert client.types() == [("shell", "kernel_info_reply"), ("iopub", "status")]
    reply = client.sent[0]
    assert reply.content_dict["ename"] == "KernelUnavailable"
    assert "restarting" in reply.content_dict["evalue"]
    assert reply.parent_msg_id == requests[-1].msg_id


def test_kernel_without_replica_refuses_and_says_why() -> None:
    kernel, _ = make_kernel()
    client = FakeClient()
    kernel.attach(client)
    request = new_message("control", "interrupt_request", {})
    kernel.handle_client_message(client, request)
    assert client.types() == [("control", "interrupt_reply"), ("iopub", "status")]
    assert "no running replica" in client.sent[0].content_dict["evalue"]


def test_dead_kernel_drops_non_requests_silently() -> None:
    kernel, _ = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.mark_dead("gone")
    client.sent.clear()
    kernel.handle_client_message(client, new_message("shell", "comm_msg", {"comm_id": "c"}))
    assert client.sent == []


def test_send_failure_is_answered_and_forgotten() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)

    def fail(msg: Message) -> None:
        raise ConnectionError("replica r1 socket is closed")

    links["r1"].on_send = fail
    request = execute_request()
    kernel.handle_client_message(client, request)
    assert len(kernel.pending) == 0
    assert client.types() == [("iopub", "error"), ("shell", "execute_reply"), ("iopub", "status")]
    assert client.sent[1].content_dict["ename"] == "KernelUnavailable"
    assert client.sent[1].content_dict["evalue"] == "replica r1 socket is closed"


def test_attach_to_a_dead_kernel_says_dead() -> None:
    kernel, _ = make_kernel("r1")
    kernel.mark_dead("gone")
    client = FakeClient()
    kernel.attach(client)
    assert client.types() == [("iopub", "status")]
    assert client.sent[0].content_dict == {"execution_state": "dead"}


def test_mark_dead_answers_every_pending_request_of_every_client() -> None:
    kernel, _ = make_kernel("r1")
    alice, bob, gone = FakeClient("alice"), FakeClient("bob"), FakeClient("gone")
    for c in (alice, bob, gone):
        kernel.attach(c)
    a1 = execute_request()
    a2 = new_message("shell", "complete_request", {"code": "x", "cursor_pos": 1})
    b1 = new_message("control", "kernel_info_request", {})
    g1 = execute_request()
    kernel.handle_client_message(alice, a1)
    kernel.handle_client_message(alice, a2)
    kernel.handle_client_message(bob, b1)
    kernel.handle_client_message(gone, g1)
    kernel.detach(gone)

    kernel.mark_dead("host h0 was lost")
    assert kernel.is_dead
    assert kernel.record.dead_reason == "host h0 was lost"
    assert len(kernel.pending) == 0

    assert alice.types() == [
        ("iopub", "error"),
        ("shell", "execute_reply"),
        ("iopub", "status"),
        ("shell", "complete_reply"),
        ("iopub", "status"),
        ("iopub", "status"),
    ]
    assert [_parent_id(m) for m in alice.sent[:5]] == [a1.msg_id] * 3 + [a2.msg_id] * 2
    assert bob.types() == [
        ("control", "kernel_info_reply"),
        ("iopub", "status"),
        ("iopub", "status"),
    ]
    assert _parent_id(bob.sent[0]) == b1.msg_id
    for c in (alice, bob):
        replies = [m for m in c.sent if m.msg_type.endswith("_reply")]
        assert all(r.content_dict["ename"] == "KernelDied" for r in replies)
        assert all("host h0 was lost" in r.content_dict["evalue"] for r in replies)
        assert c.sent[-1].content_dict == {"execution_state": "dead"}
        assert c.sent[-1].parent_msg_id is None
    assert gone.sent == []


def test_fail_pending_skips_owners_that_are_not_attached() -> None:
    kernel, _ = make_kernel("r1")
    stranger = FakeClient()
    kernel.handle_client_message(stranger, execute_request())
    assert len(kernel.pending) == 1
    kernel.fail_pending("KernelRestarted", "the kernel was restarted")
    assert stranger.sent == []
    assert len(kernel.pending) == 0


# -- the gateway's own requests ---------------------------------------------------------------


async def test_request_resolves_with_the_replica_reply() -> None:
    kernel, links = make_kernel("r1")
    link = links["r1"]
    loop = asyncio.get_running_loop()

    def answer(msg: Message) -> None:
        reply = reply_to(msg, "kernel_info_reply", {"status": "ok", "implementation": "x"})
        loop.call_soon(kernel.on_replica_message, link, reply)

    link.on_send = answer
    client = FakeClient()
    kernel.attach(client)
    reply = await kernel.request(link, "shell", "kernel_info_request", {}, timeout=5)  # type: ignore[arg-type]
    assert reply.content_dict["implementation"] == "x"
    assert link.sent[0].msg_type == "kernel_info_request"
    assert reply.parent_msg_id == link.sent[0].msg_id
    assert client.sent == []  # the gateway's own reply is not shown to clients
    assert len(kernel.pending) == 0


async def test_request_times_out_and_forgets_the_request() -> None:
    kernel, links = make_kernel("r1")
    with pytest.raises(TimeoutError):
        await kernel.request(links["r1"], "shell", "kernel_info_request", {}, timeout=0.01)  # type: ignore[arg-type]
    assert len(kernel.pending) == 0


async def test_fail_pending_fails_the_gateways_own_requests() -> None:
    kernel, links = make_kernel("r1")
    link = links["r1"]
    link.on_send = lambda msg: asyncio.get_running_loop().call_soon(kernel.mark_dead, "crashed")
    with pytest.raises(KernelUnavailable, match="the kernel died: crashed"):
        await kernel.request(link, "control", "shutdown_request", {}, timeout=5)  # type: ignore[arg-type]
    assert len(kernel.pending) == 0


# -- error_replies ----------------------------------------------------------------------------


def test_error_replies_for_execute_request() -> None:
    request = execute_request()
    error, reply, idle = error_replies("shell", "execute_request", request.header, "E", "why")
    assert (error.channel, error.msg_type) == ("iopub", "error")
    assert error.content_dict == {"ename": "E", "evalue": "why", "traceback": ["E: why"]}
    assert (reply.channel, reply.msg_type) == ("shell", "execute_reply")
    assert reply.content_dict == {
        "status": "error",
        "ename": "E",
        "evalue": "why",
        "traceback": ["E: why"],
        "execution_count": None,
    }
    assert (idle.channel, idle.msg_type) == ("iopub", "status")
    assert idle.content_dict == {"execution_state": "idle"}
    for msg in (error, reply, idle):
        assert msg.parent_header == request.header
        assert msg.parent_msg_id == request.msg_id
        assert msg.header_dict["msg_type"] == msg.msg_type
    assert len({m.msg_id for m in (error, reply, idle)}) == 3


@pytest.mark.parametrize(
    ("channel", "msg_type", "reply_type"),
    [
        ("shell", "kernel_info_request", "kernel_info_reply"),
        ("control", "interrupt_request", "interrupt_reply"),
        ("shell", "complete_request", "complete_reply"),
        ("control", "shutdown_request", "shutdown_reply"),
    ],
)
def test_error_replies_for_other_requests(channel: str, msg_type: str, reply_type: str) -> None:
    request = new_message(channel, msg_type, {})
    messages = error_replies(channel, msg_type, request.header, "KernelDead", "gone")
    assert [(m.channel, m.msg_type) for m in messages] == [
        (channel, reply_type),
        ("iopub", "status"),
    ]
    reply = messages[0]
    assert reply.content_dict["status"] == "error"
    assert "execution_count" not in reply.content_dict
    assert reply.to_dict()["parent_header"]["msg_id"] == request.msg_id


def test_requests_during_a_restart_are_held_and_delivered_to_the_new_replica() -> None:
    kernel, links = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.begin_restart()
    request = new_message("shell", "kernel_info_request", {})
    kernel.handle_client_message(client, request)
    assert links["r1"].sent == [] and client.sent == []
    kernel.end_restart()
    assert links["r1"].sent == [request]
    assert [m.content_dict.get("execution_state") for m in client.sent] == ["idle"]
    assert "restarting" not in [m.content_dict.get("execution_state") for m in client.sent]


def test_requests_held_by_a_failed_restart_are_refused_with_the_reason() -> None:
    kernel, _ = make_kernel("r1")
    client = FakeClient()
    kernel.attach(client)
    kernel.begin_restart()
    kernel.handle_client_message(client, execute_request())
    kernel.drop_link("r1")
    kernel.mark_dead("restart failed: no host")
    kernel.end_restart()
    replies = [m for m in client.sent if m.msg_type == "execute_reply"]
    assert len(replies) == 1
    assert replies[0].content_dict["ename"] == "KernelDead"
    assert "restart failed: no host" in replies[0].content_dict["evalue"]


# -- lifecycle transitions (called by the kernel manager's modules) ---------------------------


def test_a_new_kernel_is_starting_until_started_and_says_nothing_of_it() -> None:
    kernel = GatewayKernel(KernelRecord(id="k", name="python3", key="secret"))
    client = FakeClient()
    kernel.attach(client)
    assert kernel.execution_state == "starting"
    kernel.started()
    assert kernel.execution_state == "idle"
    assert client.sent == []


def test_reattached_continues_the_terms_and_ends_starting_only() -> None:
    kernel = GatewayKernel(KernelRecord(id="k", name="python3", key="secret"))
    kernel.reattached(7)
    assert (kernel.execution_state, kernel.next_term, kernel.last_replied_term) == ("idle", 8, 7)
    kernel.set_state("dead")
    kernel.reattached(3)
    assert (kernel.execution_state, kernel.next_term, kernel.last_replied_term) == ("dead", 8, 7)


def test_a_restart_forgets_the_old_replicas_and_numbers_cells_from_one() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    request = execute_request()
    kernel.handle_client_message(client, request)
    kernel.on_replica_message(links["r1"], reply_to(request, "execute_reply", {}))  # type: ignore[arg-type]
    assert (kernel.next_term, kernel.last_replied_term) == (2, 1)
    kernel.record.dead_reason = "host h1 was lost"
    kernel.begin_restart()
    assert kernel.execution_state == "restarting"
    kernel.forget_replicas()
    assert kernel.record.replicas == [] and kernel.record.dead_reason == ""
    assert kernel.executor is None
    assert (kernel.next_term, kernel.last_replied_term) == (1, 0)
    kernel.end_restart()
    assert kernel.execution_state == "idle"


def test_reclaiming_drops_the_links_first_and_leaves_the_kernel_idle() -> None:
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    kernel.reclaim()
    assert kernel.record.reclaimed
    assert kernel.links == {} and all(link.closed for link in links.values())
    assert kernel.executor is None and kernel.execution_state == "idle"
    # A replica's last status no longer reaches the clients.
    assert client.sent == []


def test_a_repair_status_is_shown_while_its_loop_runs() -> None:
    kernel, _ = make_kernel("r1")
    first, second = RepairStatus(), RepairStatus()
    kernel.repair_started(first)
    assert kernel.repair is first
    kernel.repair_started(second)
    kernel.repair_ended(first)  # an older loop ending leaves the newer one's status
    assert kernel.repair is second
    kernel.repair_ended(second)
    assert kernel.repair is None


async def test_an_interrupt_waits_for_a_sent_cell_to_begin_but_not_for_a_running_one() -> None:
    """``cells_begun``: a cell sent but not begun (no ``busy`` yet) holds the interrupt until
    it begins, at most the timeout; a running cell (``busy``) does not hold it at all."""
    kernel, links = make_kernel("r1", "r2", "r3")
    client = FakeClient()
    kernel.attach(client)
    kernel.on_replica_message(links["r1"], status("idle"))  # type: ignore[arg-type]
    first = execute_request("import time; time.sleep(10)")
    kernel.handle_client_message(client, first)
    assert await kernel.cells_begun(0.05) is False  # sent, not begun: the wait times out
    waiting = asyncio.create_task(kernel.cells_begun(5))
    await asyncio.sleep(0)
    assert not waiting.done()
    kernel.on_replica_message(links["r1"], status("busy", first))  # type: ignore[arg-type]
    assert await asyncio.wait_for(waiting, 1) is True
    # A second cell queued behind the running one: the interrupt is for the running one.
    kernel.handle_client_message(client, execute_request("print(1)"))
    assert await asyncio.wait_for(kernel.cells_begun(5), 1) is True
