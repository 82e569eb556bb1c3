"""Encrypted transport on a real cluster (docs/security.md, "Encrypted transport"): the gateway
serves https/wss with a certificate from a throw-away CA, hosts verify it (``--ca``), and
every ZMQ socket between the gateway and the three replicas of a kernel is CurveZMQ.

Each attack of issue 13 is performed and refused: a host that cannot verify the gateway
stops with a message saying so; a SUB socket without the key, connected to a replica's IOPub,
reads nothing while a cell prints (a SUB with the key, the positive control, reads it); a
48 MB frame to a replica's Raft port is refused at its header, at little CPU, and the kernel
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import zmq

from nbcluster.client import GatewayClient

from ..cluster import Cluster, free_port, running_cluster, wait_for
from ..tls_files import TlsFiles, make_tls_files

pytestmark = pytest.mark.integration

MARKER = "secret-output-7f3a"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[Cluster]:
    """TLS gateway, three hosts with --ca, kernels of three replicas, CurveZMQ (the default)."""
    state = tmp_path_factory.mktemp("secure") / "state"
    with running_cluster(state, hosts=3, replicas=3, tls=tls) as c:
        yield c


@pytest.fixture(scope="module")
def kernel(secure: Cluster) -> Iterator[str]:
    response = secure.http.post("/api/kernels", json={})
    assert response.status_code == 201, response.text
    kernel_id = str(response.json()["id"])
    yield kernel_id
    secure.http.delete(f"/api/kernels/{kernel_id}")


def _client(cluster: Cluster) -> GatewayClient:
    assert cluster.tls is not None
    return GatewayClient(cluster.url, cluster.token, timeout=60, ca=cluster.tls.ca)


def _connections(cluster: Cluster, kernel_id: str) -> list[dict[str, Any]]:
    record = cluster.state_record(kernel_id)
    return [r["connection"] for r in record["replicas"] if r["state"] == "running"]


# -- TLS ----------------------------------------------------------------------------------------


def test_the_gateway_answers_https_and_verifies(secure: Cluster, tls: TlsFiles) -> None:
    assert secure.url.startswith("https://")
    assert secure.http.get("/api").status_code == 200
    # Plain http to a TLS port gets no HTTP answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(secure.url.replace("https://", "http://") + "/api", timeout=5)
    # A client that does not trust the CA is refused by its own verification.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(secure.url + "/api", timeout=5)
    # The CLI verifies with NBCLUSTER_CA (token and URL from the environment, not argv).
    env = {
        **secure.env,
        "NBCLUSTER_URL": secure.url,
        "NBCLUSTER_CA": str(tls.ca),
        "NBCLUSTER_STATE_DIR": str(secure.state_dir / "cli"),
    }
    status = subprocess.run(
        [sys.executable, "-m", "nbcluster", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["hosts"]) == 3
    without = subprocess.run(
        [sys.executable, "-m", "nbcluster", "status", "--json"],
        env={k: v for k, v in env.items() if k != "NBCLUSTER_CA"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert without.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in without.stderr


def test_a_host_that_cannot_verify_the_gateway_is_refused(secure: Cluster, tmp_path: Path) -> None:
    other = make_tls_files(tmp_path / "other", label="other")
    secure.start_host("no-ca", ca=False)
    secure.start_host("wrong-ca", ca=other.ca)
    for name in ("no-ca", "wrong-ca"):
        proc = secure.hosts[name]
        assert proc.wait(30) == 2, name
        log = (secure.log_dir / f"{name}.log").read_text()
        assert "cannot verify the gateway's TLS certificate" in log, log
        assert "pass --ca FILE" in log
    hosts = {h["name"] for h in secure.http.get("/api/cluster/hosts").json()}
    assert hosts == {"host-1", "host-2", "host-3"}


async def test_cells_and_a_job_cell_run_over_https(secure: Cluster, kernel: str) -> None:
    async with _client(secure) as gw, gw.channels(kernel) as channels:
        result = await channels.execute(
            "import os\n"
            "print(os.environ['NBCLUSTER_GATEWAY_URL'].split(':')[0],"
            " os.environ['NBCLUSTER_GATEWAY_CA'].endswith('-ca.pem'))"
        )
        assert result.status == "ok", result.reply
        assert result.stream_text() == "https True\n"
        job = await channels.execute("%%job\nprint('hello from a job over https')\n", timeout=90)
        out = job.stream_text()
        assert job.status == "ok", (job.reply, out, job.stream_text("stderr"))
        assert "hello from a job over https" in out
        assert "succeeded" in out


# -- CurveZMQ -----------------------------------------------------------------------------------


def _subscriber(
    context: zmq.Context[zmq.Socket[bytes]], url: str, server_key: str | None
) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.SUB)
    sock.linger = 0
    if server_key is not None:
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = server_key.encode()
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(url)
    return sock


def _drain(sock: zmq.Socket[bytes]) -> bytes:
    received = b""
    while True:
        try:
            received += b"".join(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return received


async def test_a_subscriber_without_the_key_reads_nothing(secure: Cluster, kernel: str) -> None:
    connections = _connections(secure, kernel)
    assert len(connections) == 3
    assert all(c.get("curve_publickey") for c in connections)
    wrong_key = zmq.curve_keypair()[0].decode()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    spies: dict[str, list[zmq.Socket[bytes]]] = {"none": [], "wrong": [], "right": []}
    try:
        for c in connections:
            url = f"tcp://{c['ip']}:{c['iopub_port']}"
            spies["none"].append(_subscriber(context, url, None))
            spies["wrong"].append(_subscriber(context, url, wrong_key))
            spies["right"].append(_subscriber(context, url, c["curve_publickey"]))
        await asyncio.sleep(1.0)  # subscriptions take a moment to reach a PUB
        async with _client(secure) as gw, gw.channels(kernel) as channels:
            for _ in range(3):
                result = await channels.execute(f"print({MARKER!r})")
                assert result.status == "ok", result.reply
                assert result.stream_text() == f"{MARKER}\n"
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        seen = {kind: b"".join(_drain(s) for s in socks) for kind, socks in spies.items()}
    finally:
        context.destroy(linger=0)
    assert seen["none"] == b"" and seen["wrong"] == b""
    # Positive control: a subscriber with the server key reads the cell's output.
    assert MARKER.encode() in seen["right"]


def test_curve_keys_stay_in_owner_only_files(secure: Cluster, kernel: str) -> None:
    files = list(secure.state_dir.glob("hosts/*/run/kernel-*.json"))
    assert files
    secrets = []
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        info = json.loads(path.read_text())
        assert len(info["curve_secretkey"]) == 40 and len(info["curve_publickey"]) == 40
        secrets.append(info["curve_secretkey"])
    record = secure.state_dir / "gateway" / "kernels" / f"{kernel}.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    # The secret halves are nowhere else: not in the gateway's record, a command line or a log.
    assert not any(s in record.read_text() for s in secrets)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        assert not any(s in cmdline for s in secrets)
    logs = [*secure.log_dir.glob("*.log"), *secure.state_dir.glob("hosts/*/logs/*.log")]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), log


def test_plain_zmq_when_curve_is_turned_off(tmp_path: Path) -> None:
    """``--no-curve``: the replica's sockets are plain, and a keyless SUB reads them (which
    is what the default prevents)."""
    with running_cluster(tmp_path / "state", hosts=1, gateway_args=["--no-curve"]) as c:
        kernel_id = c.http.post("/api/kernels", json={}).json()["id"]
        [connection] = _connections(c, kernel_id)
        assert connection.get("curve_publickey") is None
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            spy = _subscriber(context, f"tcp://{connection['ip']}:{connection['iopub_port']}", None)
            time.sleep(1.0)

            async def run() -> None:
                async with (
                    GatewayClient(c.url, c.token) as gw,
                    gw.channels(kernel_id) as channels,
                ):
                    assert (await channels.execute(f"print({MARKER!r})")).status == "ok"

            asyncio.run(run())
            time.sleep(0.5)
            assert MARKER.encode() in _drain(spy)
        finally:
            context.destroy(linger=0)


# -- the Raft port --------------------------------------------------------------------------------


def _flood(ip: str, port: int, header: bytes, total: int) -> tuple[int, float]:
    start, sent, chunk = time.monotonic(), 0, bytes(256 * 1024)
    with socket.create_connection((ip, port), timeout=10) as sock:
        try:
            sock.sendall(header)
            sent = len(header)
            while sent < total:
                sent += sock.send(chunk[: total - sent])
            while sock.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent, time.monotonic() - start


async def test_the_raft_port_refuses_a_48mb_frame_and_garbage(secure: Cluster, kernel: str) -> None:
    record = secure.state_record(kernel)
    replica = next(r for r in record["replicas"] if r["state"] == "running")
    connection = replica["connection"]
    proc = psutil.Process(replica["pid"])
    before = proc.cpu_times()
    size = 48 * 10**6
    sent, seconds = await asyncio.to_thread(
        _flood, connection["ip"], connection["raft_port"], struct.pack("i", size), size + 4
    )
    garbage = os.urandom(8000)
    _, garbage_seconds = await asyncio.to_thread(
        _flood,
        connection["ip"],
        connection["raft_port"],
        struct.pack("i", len(garbage)) + garbage,
        len(garbage) + 4,
    )
    after = proc.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    print(f"\n48 MB frame to a replica's Raft port: closed after {sent} bytes in {seconds:.3f} s")
    print(f"garbage frame: closed in {garbage_seconds:.3f} s; replica CPU meanwhile {cpu:.2f} s")
    assert sent < 16 * 2**20  # refused at the header, not buffered
    assert seconds < 5 and garbage_seconds < 5
    assert cpu < 3.0  # 17.7 s before (the replica also serves its group meanwhile)
    async with _client(secure) as gw, gw.channels(kernel) as channels:
        result = await channels.execute("x = 6 * 7\nprint(x)")
        assert result.status == "ok", result.reply
        assert result.stream_text() == "42\n"
    wait_for(
        lambda: all(r["state"] == "running" for r in secure.replicas(kernel)),
        10,
        "every replica to stay running",
    )


def test_up_serves_tls_to_its_hosts_and_prints_https(tmp_path: Path, tls: TlsFiles) -> None:
    """``nbcluster up --certfile --keyfile --ca``: its hosts join over wss and what it prints
    is https, with the CA for JupyterLab."""
    port = free_port()
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    argv = [sys.executable, "-m", "nbcluster", "up", "--hosts", "1", "--port", str(port)]
    argv += ["--state-dir", str(state), "--certfile", str(tls.cert), "--keyfile", str(tls.key)]
    argv += ["--ca", str(tls.ca)]
    stderr = (tmp_path / "up.stderr").open("wb")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        printed: dict[str, str] = {}
        deadline = time.monotonic() + 90
        while "CONNECT" not in printed and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            key, _, value = line.partition(": ")
            printed[key] = value.strip()
        assert printed.get("URL") == f"https://127.0.0.1:{port}", (
            tmp_path / "up.stderr"
        ).read_text()
        assert f"--GatewayClient.ca_certs={tls.ca}" in printed["CONNECT"]
        with httpx.Client(
            verify=ssl.create_default_context(cafile=tls.ca),
            headers={"Authorization": f"token {printed['TOKEN']}"},
        ) as http:
            hosts = http.get(f"{printed['URL']}/api/cluster/hosts").json()
        assert [h["state"] for h in hosts] == ["connected"]
    finally:
        proc.terminate()
        proc.wait(30)
        stderr.close()
