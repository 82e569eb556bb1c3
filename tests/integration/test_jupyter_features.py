"""Jupyter protocol features through the gateway's REST API and channels websocket, against a
real gateway, host daemons and replica kernels on loopback.

One cluster serves the whole module (starting one takes seconds), and one kernel serves the
tests that leave it usable; tests that restart, interrupt or shut a kernel down start their own.
Most websocket checks run with both framings: legacy JSON and the v1 binary subprotocol.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import psutil
import pytest
import websockets

from nbcluster.client import GatewayClient, GatewayError, KernelChannels

from ..cluster import Cluster, running_cluster

pytestmark = pytest.mark.integration

#: Generous bound for anything that should take well under a second on an idle machine.
TIMEOUT = 30.0

# A 1x1 PNG, built in the kernel from bytes (zlib + struct), so no imaging library is needed.
PNG_CELL = """
import struct, zlib
from IPython.display import display, HTML, Image

def _chunk(kind, data):
    body = kind + data
    return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body) & 0xFFFFFFFF)

png = (b'\\x89PNG\\r\\n\\x1a\\n'
       + _chunk(b'IHDR', struct.pack('>IIBBBBB', 1, 1, 8, 2, 0, 0, 0))
       + _chunk(b'IDAT', zlib.compress(b'\\x00\\xff\\x00\\x00'))
       + _chunk(b'IEND', b''))
display(HTML('<b>x</b>'))
display(Image(data=png))
handle = display('first', display_id=True)
handle.update('second')
"""

# Registers a comm target that answers an open with the open's data and echoes every message
# (data and binary buffers) back on the same comm.
COMM_TARGET_CELL = """
def _echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        comm.send({'echo': msg['content']['data']}, buffers=msg['buffers'])
    comm.send({'opened': open_msg['content']['data']})

get_ipython().kernel.comm_manager.register_target('nbcluster_echo', _echo_target)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One gateway and two hosts for the module (as conftest's ``cluster``, module-scoped)."""
    with running_cluster(tmp_path_factory.mktemp("jupyter-features") / "state", hosts=2) as c:
        yield c


def _replica_pids(cluster: Cluster, kernel_id: str) -> set[int]:
    replicas: Any = cluster.kernel_summary(kernel_id)["replicas"]
    return {r["pid"] for r in replicas if r["state"] == "running"}


def _start_kernel(cluster: Cluster) -> str:
    response = cluster.http.post("/api/kernels", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def shared_kernel(cluster: Cluster) -> Iterator[str]:
    """A kernel that tests may run cells in but must leave usable."""
    kernel_id = _start_kernel(cluster)
    yield kernel_id
    cluster.http.delete(f"/api/kernels/{kernel_id}")


@pytest.fixture
def own_kernel(cluster: Cluster) -> Iterator[str]:
    """A kernel for one test, which may restart or shut it down."""
    kernel_id = _start_kernel(cluster)
    yield kernel_id
    if cluster.http.get(f"/api/kernels/{kernel_id}").status_code == 200:
        assert cluster.http.delete(f"/api/kernels/{kernel_id}").status_code == 204


@pytest.fixture(params=[False, True], ids=["legacy", "v1"])
def v1(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def gateway(cluster: Cluster) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(cluster.url, cluster.token) as client:
        yield client


@pytest.fixture
async def channels(cluster: Cluster, shared_kernel: str, v1: bool) -> AsyncIterator[KernelChannels]:
    """A websocket to the shared kernel in the framing under test."""
    async with KernelChannels(cluster.url, cluster.token, shared_kernel, v1=v1) as ch:
        yield ch


async def _collect(
    ch: KernelChannels, msg_id: str, reply_type: str, timeout: float = TIMEOUT
) -> list[dict[str, Any]]:
    """Every message parented to ``msg_id`` until its reply and the closing idle both came."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    replied = idle = False
    while not (replied and idle):
        msg = await ch.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
        messages.append(msg)
        replied = replied or msg["msg_type"] == reply_type
        idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
    return messages


async def _next_of(
    ch: KernelChannels, msg_id: str, predicate: Any, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """The first message parented to ``msg_id`` that satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ch.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
        if predicate(msg):
            return msg


async def _collect_idle(ch: KernelChannels, msg_id: str) -> None:
    """Wait for the idle status that ends the handling of ``msg_id``."""
    await _next_of(
        ch,
        msg_id,
        lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle",
    )


async def _eventually(condition: Any, timeout: float, what: str) -> None:
    """Poll the async ``condition`` until it holds, keeping the event loop running."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _wait_for_message(
    queue: asyncio.Queue[dict[str, Any]], predicate: Any, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """The first message from ``queue`` that satisfies ``predicate`` (others are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.001))
        if predicate(msg):
            return msg


def _execute_content(code: str, *, allow_stdin: bool = False) -> dict[str, Any]:
    return {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": allow_stdin,
        "stop_on_error": True,
    }


# -- REST -------------------------------------------------------------------------------------


def test_kernelspecs_list_python3_as_default(cluster: Cluster) -> None:
    response = cluster.http.get("/api/kernelspecs")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "python3"
    spec = body["kernelspecs"]["python3"]
    assert spec["name"] == "python3"
    assert spec["spec"]["language"] == "python"
    assert spec["spec"]["display_name"]
    assert any("{connection_file}" in arg for arg in spec["spec"]["argv"])


async def test_start_get_list_and_shutdown_kernel(
    cluster: Cluster, gateway: GatewayClient, v1: bool
) -> None:
    response = cluster.http.post("/api/kernels", json={"name": "python3"})
    assert response.status_code == 201, response.text
    model = response.json()
    assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
    kernel_id = model["id"]
    assert uuid.UUID(kernel_id)
    assert model["name"] == "python3"
    assert model["execution_state"] == "idle"
    assert model["connections"] == 0
    assert model["last_activity"].endswith("Z")

    assert (await gateway.get_kernel(kernel_id))["id"] == kernel_id
    assert kernel_id in [k["id"] for k in await gateway.list_kernels()]

    async def connections(n: int) -> bool:
        return bool((await gateway.get_kernel(kernel_id))["connections"] == n)

    async with KernelChannels(cluster.url, cluster.token, kernel_id, v1=v1) as ch:
        await _eventually(lambda: connections(1), TIMEOUT, "the websocket to be counted")
        result = await ch.execute("40 + 2")
        assert result.status == "ok"
    await _eventually(lambda: connections(0), TIMEOUT, "the closed websocket to be uncounted")
    after = await gateway.get_kernel(kernel_id)
    assert after["execution_state"] == "idle"
    assert datetime.fromisoformat(after["last_activity"]) > datetime.fromisoformat(
        model["last_activity"]
    )

    async with KernelChannels(cluster.url, cluster.token, kernel_id, v1=v1) as ch:
        response = await asyncio.to_thread(cluster.http.delete, f"/api/kernels/{kernel_id}")
        assert response.status_code == 204
        # The gateway closes the websocket of a kernel that was shut down.
        await asyncio.wait_for(ch.closed.wait(), TIMEOUT)

    with pytest.raises(GatewayError) as err:
        await gateway.get_kernel(kernel_id)
    assert err.value.status == 404
    assert kernel_id not in [k["id"] for k in await gateway.list_kernels()]
    assert cluster.http.delete(f"/api/kernels/{kernel_id}").status_code == 404
    # A websocket to the kernel that is gone is refused.
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await KernelChannels(cluster.url, cluster.token, kernel_id, v1=v1).connect()


# -- messages on one kernel -------------------------------------------------------------------


async def test_kernel_info(channels: KernelChannels, shared_kernel: str) -> None:
    reply = await channels.request("shell", "kernel_info_request", {}, TIMEOUT)
    content = reply["content"]
    assert reply["channel"] == "shell"
    assert content["status"] == "ok"
    assert content["implementation"] == "nbcluster"
    assert content["language_info"]["name"] == "python"
    assert content["language_info"]["file_extension"] == ".py"
    assert content["protocol_version"].startswith("5.")
    assert content["nbcluster"]["kernel_id"] == shared_kernel
    # jupyter_server asks on the control channel too; the reply comes back on it.
    reply = await channels.request("control", "kernel_info_request", {}, TIMEOUT)
    assert reply["channel"] == "control"
    assert reply["content"]["implementation"] == "nbcluster"


async def test_busy_and_idle_around_an_execute(channels: KernelChannels) -> None:
    msg_id = await channels.send("shell", "execute_request", _execute_content("'status'"))
    messages = await _collect(channels, msg_id, "execute_reply")
    iopub = [m for m in messages if m["channel"] == "iopub"]
    states = [m["content"]["execution_state"] for m in iopub if m["msg_type"] == "status"]
    assert states == ["busy", "idle"]
    assert iopub[0]["msg_type"] == "status"
    assert iopub[-1]["msg_type"] == "status"
    assert iopub[1]["msg_type"] == "execute_input"
    assert iopub[1]["content"]["code"] == "'status'"
    replies = [m for m in messages if m["msg_type"] == "execute_reply"]
    assert len(replies) == 1
    assert replies[0]["channel"] == "shell"
    assert all(m["parent_header"]["msg_id"] == msg_id for m in messages)


async def test_stdout_and_stderr_streams(channels: KernelChannels) -> None:
    result = await channels.execute(
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)"
    )
    assert result.status == "ok"
    assert result.stream_text("stdout") == "to stdout\n"
    assert result.stream_text("stderr") == "to stderr\n"


async def test_execute_result_and_execution_count(channels: KernelChannels) -> None:
    first = await channels.execute("6 * 7")
    second = await channels.execute("'a' + 'b'")
    assert first.status == second.status == "ok"
    (result1,) = first.of_type("execute_result")
    (result2,) = second.of_type("execute_result")
    assert result1["content"]["data"]["text/plain"] == "42"
    assert result2["content"]["data"]["text/plain"] == "'ab'"
    assert result1["content"]["execution_count"] == first.reply["execution_count"]
    assert result2["content"]["execution_count"] == second.reply["execution_count"]
    assert second.reply["execution_count"] == first.reply["execution_count"] + 1
    (input2,) = second.of_type("execute_input")
    assert input2["content"]["execution_count"] == second.reply["execution_count"]


async def test_queued_cells_run_in_order_and_stop_on_error(channels: KernelChannels) -> None:
    # As "Run All" does: send every cell at once; replies come in order. After an error the
    # cells already queued are aborted (stop_on_error), and later ones run again.
    cells = [
        "queued = [1]",
        "queued.append(2)",
        "import time\ntime.sleep(0.5)\nraise ValueError('stop here')",
        "queued.append(4)",
    ]
    ids = [
        await channels.send("shell", "execute_request", _execute_content(code)) for code in cells
    ]
    replies = [
        (await _next_of(channels, msg_id, lambda m: m["msg_type"] == "execute_reply"))["content"]
        for msg_id in ids
    ]
    assert [r["status"] for r in replies] == ["ok", "ok", "error", "aborted"]
    assert replies[1]["execution_count"] == replies[0]["execution_count"] + 1
    assert replies[2]["execution_count"] == replies[1]["execution_count"] + 1
    assert replies[2]["ename"] == "ValueError"
    result = await channels.execute("queued")
    assert result.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "[1, 2]"


async def test_silent_execute_and_user_expressions(channels: KernelChannels) -> None:
    before = (await channels.execute("'count'")).reply["execution_count"]
    silent = await channels.execute("print('quiet'); 1 + 1", silent=True)
    assert silent.status == "ok"
    assert not silent.of_type("execute_input")
    assert not silent.of_type("execute_result")
    assert silent.stream_text() == "quiet\n"  # stdout still shows; only results are hidden
    content = _execute_content("expr_base = 20")
    content["user_expressions"] = {"doubled": "expr_base * 2", "broken": "1 / 0"}
    msg_id = await channels.send("shell", "execute_request", content)
    messages = await _collect(channels, msg_id, "execute_reply")
    (reply,) = [m["content"] for m in messages if m["msg_type"] == "execute_reply"]
    assert reply["execution_count"] == before + 1  # the silent cell did not count
    assert reply["user_expressions"]["doubled"]["status"] == "ok"
    assert reply["user_expressions"]["doubled"]["data"]["text/plain"] == "40"
    assert reply["user_expressions"]["broken"]["status"] == "error"
    assert reply["user_expressions"]["broken"]["ename"] == "ZeroDivisionError"


async def test_display_data_html_and_png(channels: KernelChannels) -> None:
    result = await channels.execute(PNG_CELL)
    assert result.status == "ok", result.reply
    html, image, *_ = result.of_type("display_data")
    assert html["content"]["data"]["text/html"] == "<b>x</b>"
    assert "text/plain" in html["content"]["data"]
    png = base64.b64decode(image["content"]["data"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"IHDR" in png
    assert b"IEND" in png
    (first,) = [m for m in result.of_type("display_data") if m is not html and m is not image]
    (update,) = result.of_type("update_display_data")
    display_id = first["content"]["transient"]["display_id"]
    assert display_id
    assert update["content"]["transient"]["display_id"] == display_id
    assert first["content"]["data"]["text/plain"] == "'first'"
    assert update["content"]["data"]["text/plain"] == "'second'"

    cleared = await channels.execute(
        "from IPython.display import clear_output\nprint('gone')\nclear_output(wait=True)"
    )
    (clear,) = cleared.of_type("clear_output")
    assert clear["content"]["wait"] is True


async def test_error_with_traceback(channels: KernelChannels) -> None:
    result = await channels.execute("def f():\n    return 1 / 0\n\nf()")
    assert result.status == "error"
    assert result.reply["ename"] == "ZeroDivisionError"
    assert "division by zero" in result.reply["evalue"]
    assert isinstance(result.reply["traceback"], list)
    assert result.reply["traceback"]
    assert all(isinstance(line, str) for line in result.reply["traceback"])
    (error,) = result.of_type("error")
    assert error["content"]["ename"] == "ZeroDivisionError"
    assert any("f()" in line for line in error["content"]["traceback"])
    # The kernel goes on after an error.
    assert (await channels.execute("'still here'")).status == "ok"


async def test_input_over_stdin(channels: KernelChannels) -> None:
    code = "name = input('who? ')\nprint('hello', name)"
    msg_id = await channels.send(
        "shell", "execute_request", _execute_content(code, allow_stdin=True)
    )
    prompt = await _next_of(channels, msg_id, lambda m: m["msg_type"] == "input_request")
    assert prompt["channel"] == "stdin"
    assert prompt["content"]["prompt"] == "who? "
    assert prompt["content"]["password"] is False
    await channels.send("stdin", "input_reply", {"value": "nbcluster"}, parent=prompt["header"])
    messages = await _collect(channels, msg_id, "execute_reply")
    (reply,) = [m for m in messages if m["msg_type"] == "execute_reply"]
    assert reply["content"]["status"] == "ok"
    stdout = "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    assert "hello nbcluster\n" in stdout
    # The client helper answers prompts too.
    result = await channels.execute("print(input() * 2)", stdin=["ab"])
    assert result.stream_text() == "abab\n"


async def test_complete_inspect_is_complete(channels: KernelChannels) -> None:
    assert (await channels.execute("zz_feature_variable = 12345")).status == "ok"

    reply = await channels.request(
        "shell", "complete_request", {"code": "zz_feature_v", "cursor_pos": 12}, TIMEOUT
    )
    assert reply["content"]["status"] == "ok"
    assert "zz_feature_variable" in reply["content"]["matches"]
    assert reply["content"]["cursor_start"] == 0
    assert reply["content"]["cursor_end"] == 12

    reply = await channels.request(
        "shell",
        "inspect_request",
        {"code": "zz_feature_variable", "cursor_pos": 19, "detail_level": 0},
        TIMEOUT,
    )
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["found"] is True
    assert "12345" in reply["content"]["data"]["text/plain"]

    reply = await channels.request(
        "shell", "is_complete_request", {"code": "for i in range(3):"}, TIMEOUT
    )
    assert reply["content"]["status"] == "incomplete"
    assert isinstance(reply["content"]["indent"], str)
    reply = await channels.request("shell", "is_complete_request", {"code": "x = 1"}, TIMEOUT)
    assert reply["content"]["status"] == "complete"


async def test_history(channels: KernelChannels) -> None:
    marker = f"history_marker_{uuid.uuid4().hex[:8]} = 1"
    assert (await channels.execute(marker)).status == "ok"
    reply = await channels.request(
        "shell",
        "history_request",
        {"output": False, "raw": True, "hist_access_type": "tail", "n": 50},
        TIMEOUT,
    )
    assert reply["content"]["status"] == "ok"
    sources = [entry[2] for entry in reply["content"]["history"]]
    assert marker in sources


async def test_comm_open_message_and_binary_buffers(channels: KernelChannels) -> None:
    assert (await channels.execute(COMM_TARGET_CELL)).status == "ok"
    comm_id = uuid.uuid4().hex

    open_id = await channels.send(
        "shell",
        "comm_open",
        {"comm_id": comm_id, "target_name": "nbcluster_echo", "data": {"hello": "world"}},
    )
    opened = await _next_of(channels, open_id, lambda m: m["msg_type"] == "comm_msg")
    assert opened["channel"] == "iopub"
    assert opened["content"]["comm_id"] == comm_id
    assert opened["content"]["data"] == {"opened": {"hello": "world"}}

    info = await channels.request(
        "shell", "comm_info_request", {"target_name": "nbcluster_echo"}, TIMEOUT
    )
    assert info["content"]["comms"][comm_id]["target_name"] == "nbcluster_echo"

    buffers = [bytes(range(256)), b"\x00second\xff" * 1000, b""]
    msg_id = await channels.send(
        "shell", "comm_msg", {"comm_id": comm_id, "data": {"n": 42}}, buffers=buffers
    )
    echo = await _next_of(channels, msg_id, lambda m: m["msg_type"] == "comm_msg")
    assert echo["channel"] == "iopub"
    assert echo["content"]["comm_id"] == comm_id
    assert echo["content"]["data"] == {"echo": {"n": 42}}
    assert [bytes(b) for b in echo["buffers"]] == buffers

    close_id = await channels.send("shell", "comm_close", {"comm_id": comm_id, "data": {}})
    await _collect_idle(channels, close_id)
    info = await channels.request("shell", "comm_info_request", {}, TIMEOUT)
    assert comm_id not in info["content"]["comms"]


async def test_large_output_arrives_complete(channels: KernelChannels) -> None:
    size = 5 * 2**20
    result = await channels.execute(f"print('0123456789abcdef' * {size // 16})", timeout=120)
    assert result.status == "ok"
    text = result.stream_text()
    assert len(text) == size + 1
    assert text == "0123456789abcdef" * (size // 16) + "\n"


async def test_large_binary_buffers_both_ways(channels: KernelChannels) -> None:
    assert (await channels.execute(COMM_TARGET_CELL)).status == "ok"
    comm_id = uuid.uuid4().hex
    open_id = await channels.send(
        "shell", "comm_open", {"comm_id": comm_id, "target_name": "nbcluster_echo", "data": {}}
    )
    await _collect_idle(channels, open_id)
    big = bytes(range(256)) * (8 * 2**20 // 256)
    msg_id = await channels.send(
        "shell", "comm_msg", {"comm_id": comm_id, "data": {}}, buffers=[big, b"tail"]
    )
    echo = await _next_of(channels, msg_id, lambda m: m["msg_type"] == "comm_msg")
    assert [bytes(b) for b in echo["buffers"]] == [big, b"tail"]


async def test_two_clients_share_iopub_but_not_replies(
    cluster: Cluster, shared_kernel: str
) -> None:
    async with (
        KernelChannels(cluster.url, cluster.token, shared_kernel) as requester,
        KernelChannels(cluster.url, cluster.token, shared_kernel, v1=True) as watcher,
    ):
        result = await requester.execute("print('seen by both')")
        assert result.status == "ok"
        assert result.stream_text() == "seen by both\n"
        msg_id = result.of_type("execute_input")[0]["parent_header"]["msg_id"]

        # The watcher gets the cell's IOPub (not parented to anything it sent) ...
        seen: list[dict[str, Any]] = []

        def is_idle_of_cell(msg: dict[str, Any]) -> bool:
            seen.append(msg)
            return (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            )

        await _wait_for_message(watcher.unrouted, is_idle_of_cell)
        of_cell = [m for m in seen if m["parent_header"].get("msg_id") == msg_id]
        assert {m["channel"] for m in of_cell} == {"iopub"}
        streams = [m["content"]["text"] for m in of_cell if m["msg_type"] == "stream"]
        assert "".join(streams) == "seen by both\n"

        # ... but not its reply. A request of its own on the same shell socket is answered
        # after the execute reply, so once that arrives any misrouted reply would have too.
        info = await watcher.request("shell", "kernel_info_request", {}, TIMEOUT)
        assert info["content"]["status"] == "ok"
        while not watcher.unrouted.empty():
            msg = watcher.unrouted.get_nowait()
            assert msg["channel"] == "iopub", msg


# -- interrupt and restart --------------------------------------------------------------------


async def test_interrupt_a_running_cell(
    cluster: Cluster, gateway: GatewayClient, own_kernel: str, v1: bool
) -> None:
    async with KernelChannels(cluster.url, cluster.token, own_kernel, v1=v1) as ch:
        # Interrupting an idle kernel is harmless.
        await gateway.interrupt_kernel(own_kernel)
        assert (await ch.execute("'idle interrupt'")).status == "ok"

        msg_id = await ch.send(
            "shell",
            "execute_request",
            _execute_content("import time\nprint('sleeping', flush=True)\ntime.sleep(60)"),
        )
        await _next_of(ch, msg_id, lambda m: m["msg_type"] == "stream")
        assert (await gateway.get_kernel(own_kernel))["execution_state"] == "busy"
        started = time.monotonic()
        await gateway.interrupt_kernel(own_kernel)
        messages = await _collect(ch, msg_id, "execute_reply", timeout=10)
        assert time.monotonic() - started < 10
        (reply,) = [m for m in messages if m["msg_type"] == "execute_reply"]
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert [m for m in messages if m["msg_type"] == "error"]

        # A cell waiting for input() is interrupted too.
        msg_id = await ch.send(
            "shell",
            "execute_request",
            _execute_content("input('never answered')", allow_stdin=True),
        )
        await _next_of(ch, msg_id, lambda m: m["msg_type"] == "input_request")
        await gateway.interrupt_kernel(own_kernel)
        messages = await _collect(ch, msg_id, "execute_reply", timeout=10)
        (reply,) = [m for m in messages if m["msg_type"] == "execute_reply"]
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        result = await ch.execute("'alive after interrupt'")
        assert result.status == "ok"
        assert result.of_type("execute_result")[0]["content"]["data"]["text/plain"] == (
            "'alive after interrupt'"
        )


async def test_restart_clears_state_and_keeps_websockets_working(
    cluster: Cluster, gateway: GatewayClient, own_kernel: str, v1: bool
) -> None:
    async with KernelChannels(cluster.url, cluster.token, own_kernel, v1=v1) as ch:
        assert (await ch.execute("restart_marker = 42")).status == "ok"
        assert (await ch.execute("restart_marker")).of_type("execute_result")
        # A cell still running when the kernel restarts is answered, not left hanging.
        running = await ch.send(
            "shell",
            "execute_request",
            _execute_content("import time\nprint('sleeping', flush=True)\ntime.sleep(60)"),
        )
        await _next_of(ch, running, lambda m: m["msg_type"] == "stream")

        old_pids = _replica_pids(cluster, own_kernel)
        model = await gateway.restart_kernel(own_kernel)
        assert model["id"] == own_kernel
        assert model["execution_state"] == "idle"
        # A restart replaces the replica processes.
        new_pids = _replica_pids(cluster, own_kernel)
        assert new_pids
        assert not new_pids & old_pids
        assert not [pid for pid in old_pids if psutil.pid_exists(pid)]

        cut_short = await _collect(ch, running, "execute_reply", timeout=10)
        (reply,) = [m for m in cut_short if m["msg_type"] == "execute_reply"]
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KernelRestarted"
        # The websocket saw the kernel come back idle, and no 'restarting' status: JupyterLab
        # takes that for an automatic restart after a crash ("the kernel appears to have died").
        states: list[str] = []

        def is_idle(msg: dict[str, Any]) -> bool:
            if msg["msg_type"] == "status":
                states.append(msg["content"]["execution_state"])
            return bool(states) and states[-1] == "idle"

        await _wait_for_message(ch.unrouted, is_idle)
        assert "restarting" not in states

        # The same websocket reaches the restarted kernel, whose namespace is fresh.
        result = await ch.execute("restart_marker")
        assert result.status == "error"
        assert result.reply["ename"] == "NameError"
        assert result.reply["execution_count"] == 1
        info = await ch.request("shell", "kernel_info_request", {}, TIMEOUT)
        assert info["content"]["implementation"] == "nbcluster"

    # So does a new one (JupyterLab reconnects after a restart).
    async with KernelChannels(cluster.url, cluster.token, own_kernel, v1=v1) as again:
        result = await again.execute("print('after restart')")
        assert result.status == "ok"
        assert result.stream_text() == "after restart\n"
        assert result.reply["execution_count"] == 2
