"""Kernel and cluster lifecycle against real processes: host and replica deaths, a gateway
restart, shutdown, hostile input (bad signatures, malformed frames, bad tokens) and what the
cluster API and metrics report.

Every test gets a fresh cluster (the ``cluster`` fixture: a gateway and two host daemons with
two virtual GPUs each, hosts lost after 3 s of silence), because most of them break it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import zmq
from jupyter_client.session import Session
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nbcluster.client import GatewayClient, GatewayError, KernelChannels

from ..cluster import Cluster, async_wait_for, process_gone, processes_mentioning

pytestmark = pytest.mark.integration

#: Bound for things that take well under a second on an idle machine.
QUICK = 10.0


def execute_content(code: str) -> dict[str, Any]:
    return {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }


async def until_reply(
    ch: KernelChannels, msg_id: str, reply_type: str, timeout: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Messages parented to ``msg_id`` up to its reply: (the reply, those before it)."""
    deadline = time.monotonic() + timeout
    before: list[dict[str, Any]] = []
    while True:
        msg = await ch.next_for(msg_id, max(deadline - time.monotonic(), 0.001))
        if msg["msg_type"] == reply_type:
            return msg, before
        before.append(msg)


async def unparented_status(ch: KernelChannels, state: str, timeout: float) -> None:
    """Wait for a kernel-wide (unparented) ``status`` message announcing ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ch.unrouted.get(), max(deadline - time.monotonic(), 0.001))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == state:
            return


def drain_unparented(ch: KernelChannels) -> None:
    while not ch.unrouted.empty():
        ch.unrouted.get_nowait()


def kernel_state(cluster: Cluster, kernel_id: str) -> str:
    state: str = cluster.http.get(f"/api/kernels/{kernel_id}").json()["execution_state"]
    return state


async def replica_pid(ch: KernelChannels) -> int:
    result = await ch.execute("import os; print(os.getpid())", timeout=QUICK)
    assert result.status == "ok", result.reply
    return int(result.stream_text())


def execute_result_text(outputs: list[dict[str, Any]]) -> str:
    results = [o for o in outputs if o["msg_type"] == "execute_result"]
    assert len(results) == 1, outputs
    text: str = results[0]["content"]["data"]["text/plain"]
    return text


# -- host death ------------------------------------------------------------------------------


async def test_host_death_fails_in_flight_cell_and_restart_moves_the_kernel(
    cluster: Cluster,
) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kernel_id = (await gw.start_kernel())["id"]
        [replica] = cluster.replicas(kernel_id)
        doomed = replica["host"]
        [survivor] = [h for h in cluster.hosts if h != doomed]

        async with gw.channels(kernel_id) as ch:
            pid = await replica_pid(ch)
            assert pid == replica["pid"]
            cell = await ch.send(
                "shell", "execute_request", execute_content("import time; time.sleep(60)")
            )
            # The cell is running once the kernel has echoed its input.
            while (await ch.next_for(cell, QUICK))["msg_type"] != "execute_input":
                pass

            killed_at = time.monotonic()
            cluster.kill_host(doomed)

            # The in-flight cell is answered with an error naming the problem: no hang.
            reply, before = await until_reply(ch, cell, "execute_reply", QUICK)
            assert time.monotonic() - killed_at < 5.0
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KernelDied"
            assert doomed in reply["content"]["evalue"]
            assert any(m["msg_type"] == "error" for m in before), before
            await unparented_status(ch, "dead", QUICK)

            # The replica died with its host daemon (PR_SET_PDEATHSIG).
            await async_wait_for(lambda: process_gone(pid), QUICK, "the replica to die")
            assert kernel_state(cluster, kernel_id) == "dead"
            summary = cluster.kernel_summary(kernel_id)
            [dead] = cluster.replicas(kernel_id)
            assert dead["state"] == "dead"
            assert f"host {doomed}" in dead["reason"]
            assert f"host {doomed}" in str(summary["dead_reason"])

            # A new cell on the dead kernel is refused at once, with a 'dead' status.
            drain_unparented(ch)
            asked_at = time.monotonic()
            result = await ch.execute("1 + 1", timeout=QUICK)
            assert time.monotonic() - asked_at < 2.0
            assert result.status == "error"
            assert result.reply["ename"] == "KernelDead"
            assert "Restart" in result.reply["evalue"]
            assert [o["content"]["ename"] for o in result.of_type("error")] == ["KernelDead"]
            await unparented_status(ch, "dead", QUICK)

        hosts = {h["name"]: h for h in await gw.hosts()}
        assert hosts[doomed]["state"] in ("disconnected", "lost")
        assert hosts[doomed]["replicas"] == []
        assert hosts[survivor]["state"] == "connected"

        restarted = await gw.restart_kernel(kernel_id)
        assert restarted["id"] == kernel_id
        assert restarted["execution_state"] == "idle"
        live = [r for r in cluster.replicas(kernel_id) if r["state"] == "running"]
        assert [r["host"] for r in live] == [survivor]
        async with gw.channels(kernel_id) as ch:
            result = await ch.execute("print(6 * 7)", timeout=QUICK)
            assert result.status == "ok", result.reply
            assert result.stream_text() == "42\n"
            assert await replica_pid(ch) == live[0]["pid"]


# -- replica crash ---------------------------------------------------------------------------


async def test_replica_crash_kills_only_its_kernel(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        victim = (await gw.start_kernel())["id"]
        bystander = (await gw.start_kernel())["id"]
        [replica] = cluster.replicas(victim)
        host = replica["host"]

        os.kill(replica["pid"], signal.SIGKILL)
        await async_wait_for(
            lambda: kernel_state(cluster, victim) == "dead", QUICK, "the kernel to be dead"
        )
        summary = cluster.kernel_summary(victim)
        [dead] = cluster.replicas(victim)
        assert dead["state"] == "dead"
        assert "exited" in dead["reason"]
        assert str(-signal.SIGKILL) in dead["reason"]
        assert host in str(summary["dead_reason"])

        # The host daemon lives on and the gateway keeps serving.
        assert cluster.hosts[host].poll() is None
        assert sorted(cluster.connected_hosts()) == sorted(cluster.hosts)
        assert kernel_state(cluster, bystander) == "idle"
        async with gw.channels(bystander) as ch:
            result = await ch.execute("print('still here')", timeout=QUICK)
            assert result.stream_text() == "still here\n"
        async with gw.channels(victim) as ch:
            result = await ch.execute("1", timeout=QUICK)
            assert result.reply["ename"] == "KernelDead"
        fresh = (await gw.start_kernel())["id"]
        async with gw.channels(fresh) as ch:
            assert (await ch.execute("1", timeout=QUICK)).status == "ok"


# -- gateway restart -------------------------------------------------------------------------


async def test_gateway_restart_reattaches_running_kernels(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kept = (await gw.start_kernel())["id"]
        gone = (await gw.start_kernel())["id"]
        [kept_replica] = cluster.replicas(kept)
        [gone_replica] = cluster.replicas(gone)
        async with gw.channels(kept) as ch:
            assert (await ch.execute("x = 41", timeout=QUICK)).status == "ok"
        await gw.shutdown_kernel(gone)
        await async_wait_for(
            lambda: process_gone(gone_replica["pid"]), QUICK, "the shut-down replica to exit"
        )

    old = KernelChannels(cluster.url, cluster.token, kept)
    await old.connect()
    cluster.kill_gateway()
    # Open websockets close with the gateway; replicas keep running on their hosts.
    await asyncio.wait_for(old.closed.wait(), QUICK)
    await old.close()
    assert not process_gone(kept_replica["pid"])

    cluster.start_gateway()
    await async_wait_for(
        lambda: sorted(cluster.connected_hosts()) == sorted(cluster.hosts),
        QUICK,
        "the hosts to reconnect",
    )
    await async_wait_for(
        lambda: kernel_state(cluster, kept) == "idle", QUICK, "the kernel to be re-attached"
    )
    assert cluster.replicas(kept)[0]["state"] == "running"
    async with KernelChannels(cluster.url, cluster.token, kept) as ch:
        result = await ch.execute("x + 1", timeout=QUICK)
        assert result.status == "ok", result.reply
        assert execute_result_text(result.outputs) == "42"
        assert await replica_pid(ch) == kept_replica["pid"]

    assert cluster.http.get(f"/api/kernels/{gone}").status_code == 404
    assert [k["id"] for k in cluster.http.get("/api/kernels").json()] == [kept]


# -- shutdown --------------------------------------------------------------------------------


async def test_shutdown_leaves_no_replica_processes(cluster: Cluster) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        ids = [(await gw.start_kernel())["id"] for _ in range(3)]
        pids = [cluster.replicas(k)[0]["pid"] for k in ids]
        assert {cluster.replicas(k)[0]["host"] for k in ids} == set(cluster.hosts)
        assert all(not process_gone(pid) for pid in pids)

        for kernel_id in ids:
            await gw.shutdown_kernel(kernel_id)
        assert await gw.list_kernels() == []
        await async_wait_for(
            lambda: all(process_gone(pid) for pid in pids), QUICK, "every replica to exit"
        )
        leftovers = [
            p.info["cmdline"]
            for p in processes_mentioning(cluster.state_dir)
            if "nbcluster.kernel" in p.info["cmdline"]
        ]
        assert leftovers == []
        assert list((cluster.state_dir / "gateway" / "kernels").glob("*.json")) == []

        for kernel_id in ids:
            with pytest.raises(GatewayError) as info:
                await gw.shutdown_kernel(kernel_id)
            assert info.value.status == 404
        assert cluster.http.get(f"/api/kernels/{ids[0]}").status_code == 404


# -- signatures ------------------------------------------------------------------------------


async def test_replica_ignores_badly_signed_messages(cluster: Cluster, tmp_path: Path) -> None:
    kernel_id = cluster.http.post("/api/kernels", json={}).json()["id"]
    record = cluster.state_record(kernel_id)
    connection = record["replicas"][0]["connection"]
    forged = tmp_path / "forged"
    control = tmp_path / "control"

    context = zmq.Context()
    shell = context.socket(zmq.DEALER)
    shell.linger = 0
    if connection.get("curve_publickey"):
        # CurveZMQ is on (the default): this test is about signatures, so it gets in.
        public, secret = zmq.curve_keypair()
        shell.curve_publickey, shell.curve_secretkey = public, secret
        shell.curve_serverkey = connection["curve_publickey"].encode()
    try:
        shell.connect(f"tcp://{connection['ip']}:{connection['shell_port']}")
        bad = Session(key=b"wrong", signature_scheme="hmac-sha256")
        good = Session(key=record["key"].encode(), signature_scheme="hmac-sha256")
        forged_msg = bad.send(
            shell,
            "execute_request",
            execute_content(f"open({str(forged)!r}, 'w').write('pwned')"),
        )
        # Same socket, same kernel: the replica handles these in order, so once the second one
        # (correctly signed: the positive control) is answered, the first was dealt with.
        control_msg = good.send(
            shell, "execute_request", execute_content(f"open({str(control)!r}, 'w').write('ok')")
        )
        poller = zmq.Poller()
        poller.register(shell, zmq.POLLIN)
        replies = []
        deadline = time.monotonic() + QUICK
        while not any(r["parent_header"].get("msg_id") == control_msg["msg_id"] for r in replies):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no reply to the correctly signed request: {replies}"
            if poller.poll(remaining * 1000):
                _, frames = good.feed_identities(shell.recv_multipart())
                replies.append(good.deserialize(frames))
    finally:
        shell.close()
        context.term()

    assert control.read_text() == "ok"
    assert not forged.exists()
    assert [r["parent_header"]["msg_id"] for r in replies] == [control_msg["msg_id"]]
    assert forged_msg["msg_id"] not in {r["parent_header"]["msg_id"] for r in replies}

    async with KernelChannels(cluster.url, cluster.token, kernel_id) as ch:
        result = await ch.execute(f"import os; print(os.path.exists({str(forged)!r}))")
        assert result.status == "ok"
        assert result.stream_text() == "False\n"


# -- malformed websocket frames --------------------------------------------------------------


def rejected_from_clients(cluster: Cluster) -> float:
    return cluster.metric("nbcluster_messages_rejected_total", source="client") or 0.0


async def test_malformed_frames_are_rejected_and_the_socket_survives(cluster: Cluster) -> None:
    kernel_id = cluster.http.post("/api/kernels", json={}).json()["id"]
    header = {
        "msg_id": "m1",
        "msg_type": "execute_request",
        "session": "s",
        "username": "u",
        "version": "5.4",
    }
    good_body = {"header": header, "parent_header": {}, "metadata": {}}
    malformed: list[str | bytes] = [
        "this is not JSON {",
        "[1, 2, 3]",
        orjson.dumps({**good_body, "channel": "bogus", "content": execute_content("1")}).decode(),
        orjson.dumps(
            {
                **good_body,
                "channel": "shell",
                "header": {k: v for k, v in header.items() if k != "msg_id"},
                "content": execute_content("1"),
            }
        ).decode(),
        orjson.dumps({**good_body, "channel": "shell", "content": "print('hi')"}).decode(),
        b"\x00\x01",
    ]
    before = rejected_from_clients(cluster)
    async with KernelChannels(cluster.url, cluster.token, kernel_id) as ch:
        for frame in malformed:
            await ch.send_raw(frame)
        result = await ch.execute("print('valid')", timeout=QUICK)
        assert result.status == "ok", result.reply
        assert result.stream_text() == "valid\n"
        assert not ch.closed.is_set()
    assert rejected_from_clients(cluster) - before == len(malformed)


async def test_requests_to_a_dead_kernel_get_error_replies(cluster: Cluster) -> None:
    kernel_id = cluster.http.post("/api/kernels", json={}).json()["id"]
    async with KernelChannels(cluster.url, cluster.token, kernel_id) as ch:
        os.kill(cluster.replicas(kernel_id)[0]["pid"], signal.SIGKILL)
        await unparented_status(ch, "dead", QUICK)
        for channel, msg_type in (
            ("shell", "complete_request"),
            ("shell", "kernel_info_request"),
            ("control", "interrupt_request"),
        ):
            content = {"code": "pri", "cursor_pos": 3} if msg_type == "complete_request" else {}
            reply = await ch.request(channel, msg_type, content, timeout=QUICK)
            assert reply["channel"] == channel
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KernelDead"
            assert "dead" in reply["content"]["evalue"]
        # A message that asks for nothing is dropped; the socket stays usable.
        await ch.send("stdin", "input_reply", {"value": "x"})
        reply = await ch.request("shell", "kernel_info_request", {}, timeout=QUICK)
        assert reply["content"]["ename"] == "KernelDead"


# -- authentication --------------------------------------------------------------------------


async def test_websocket_needs_the_token(cluster: Cluster) -> None:
    kernel_id = cluster.http.post("/api/kernels", json={}).json()["id"]
    ws_url = cluster.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    for url, headers in (
        (ws_url, {}),
        (ws_url + "?token=wrong", {}),
        (ws_url, {"Authorization": "token wrong"}),
    ):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        await KernelChannels(cluster.url, "wrong", kernel_id).connect()
    # The right token, either way, is let in.
    async with connect(ws_url + f"?token={cluster.token}") as ws:
        assert ws.protocol.state.name == "OPEN"
    async with KernelChannels(cluster.url, cluster.token, kernel_id) as ch:
        assert (await ch.execute("1", timeout=QUICK)).status == "ok"


def test_rest_needs_the_token(cluster: Cluster) -> None:
    for path in ("/api/kernels", "/api/kernelspecs", "/api/cluster/hosts", "/metrics"):
        missing = httpx.get(cluster.url + path)
        assert missing.status_code == 401, path
        assert missing.json()["reason"] == "missing token"
        assert missing.headers["www-authenticate"] == "token"
        wrong = httpx.get(cluster.url + path, headers={"Authorization": "token wrong"})
        assert wrong.status_code == 403, path
        assert wrong.json()["reason"] == "invalid token"
        assert httpx.get(cluster.url + path, params={"token": "wrong"}).status_code == 403
        assert httpx.get(cluster.url + path, params={"token": cluster.token}).status_code == 200
    assert httpx.post(cluster.url + "/api/kernels", json={}).status_code == 401
    assert cluster.http.get("/api/kernels").json() == []


@pytest.mark.parametrize("which", ["wrong", "admin"])
def test_host_with_a_wrong_token_exits_with_code_2(
    cluster: Cluster, tmp_path: Path, which: str
) -> None:
    """A host joins with the join token only: a wrong one, and the admin token (good for
    everything but joining), are refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    env["NBCLUSTER_JOIN_TOKEN"] = "wrong" if which == "wrong" else cluster.token
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "host",
            "--gateway",
            cluster.url,
            "--name",
            "intruder",
            "--state-dir",
            str(tmp_path / "intruder"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refused this host's token" in proc.stderr
    assert "HTTP 403" in proc.stderr
    assert time.monotonic() - started < 30
    assert "intruder" not in {h["name"] for h in cluster.http.get("/api/cluster/hosts").json()}


# -- cluster API and metrics -----------------------------------------------------------------


async def test_hosts_and_metrics_describe_the_cluster(cluster: Cluster) -> None:
    hosts = cluster.http.get("/api/cluster/hosts").json()
    assert [h["name"] for h in hosts] == ["host-1", "host-2"]
    for host in hosts:
        assert host["state"] == "connected"
        assert isinstance(host["cpus"], int) and host["cpus"] >= 1
        assert isinstance(host["memory_mb"], int) and host["memory_mb"] > 0
        assert [g["index"] for g in host["gpus"]] == [0, 1]
        assert all(g["virtual"] and g["memory_mb"] > 0 for g in host["gpus"])
        assert host["replicas"] == []

    assert cluster.metric("nbcluster_hosts", state="connected") == 2
    assert cluster.metric("nbcluster_kernels", state="idle") is None

    kernel_id = cluster.http.post("/api/kernels", json={}).json()["id"]
    [replica] = cluster.replicas(kernel_id)
    hosts = {h["name"]: h for h in cluster.http.get("/api/cluster/hosts").json()}
    assert hosts[replica["host"]]["replicas"] == [
        {"kernel_id": kernel_id, "replica_id": replica["replica_id"], "state": "running"}
    ]
    [other] = [h for h in hosts.values() if h["name"] != replica["host"]]
    assert other["replicas"] == []

    async with KernelChannels(cluster.url, cluster.token, kernel_id) as ch:
        assert (await ch.execute("print(1)", timeout=QUICK)).status == "ok"
        assert cluster.metric("nbcluster_client_connections") == 1

    metrics = cluster.metrics()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.get((name, frozenset(labels.items())))

    assert sample("nbcluster_hosts", state="connected") == 2
    assert sample("nbcluster_kernels", state="idle") == 1
    assert sample("nbcluster_replicas", state="running") == 1
    assert sample("nbcluster_host_gpus", host="host-1") == 2
    assert (sample("nbcluster_messages_routed_total", channel="shell", direction="in") or 0) >= 1
    assert (sample("nbcluster_messages_routed_total", channel="shell", direction="out") or 0) >= 1
    assert (sample("nbcluster_messages_routed_total", channel="iopub", direction="out") or 0) >= 3
    started = sample(
        "nbcluster_http_request_duration_seconds_count",
        method="POST",
        route="/api/kernels",
        status="201",
    )
    assert started == 1
    assert any(name == "nbcluster_http_request_duration_seconds_bucket" for name, _ in metrics)
    assert (sample("nbcluster_kernel_start_seconds_count") or 0) == 1
