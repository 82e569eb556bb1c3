"""Limits, attacked (docs/security.md, "Limits"): oversize KERNEL_* values and bodies, a job
source over its cap, slow-header connections and a stalled server-sent-events client are each
refused or dropped, nothing is lost, and the gateway keeps serving."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from ..cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("limits") / "state",
        hosts=2,
        gateway_args=["--header-timeout", str(HEADER_TIMEOUT), "--subscriber-buffer-mb", "0.25"],
    ) as c:
        yield c


def _connect(c: Cluster, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", c.port))
    return sock


def _read_until_closed(sock: socket.socket, timeout: float, limit: int = 256 * 2**20) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``timeout``)."""
    sock.settimeout(timeout)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        assert time.monotonic() < deadline, "the gateway did not close the connection"
        try:
            chunk = sock.recv(2**16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _hosts_stay_connected(c: Cluster) -> None:
    assert sorted(c.connected_hosts()) == ["host-1", "host-2"]
    assert "disconnected" not in (c.log_dir / "gateway.log").read_text()


def test_oversize_kernel_env_is_refused_and_no_host_is_disconnected(cluster: Cluster) -> None:
    c = cluster
    r = c.http.post("/api/kernels", json={"env": {"KERNEL_X": "x" * 2**20}})
    assert r.status_code == 400, r.text
    assert "over the limit of 65536 bytes per value" in r.json()["message"]
    many = {f"KERNEL_V{i}": "x" * 60_000 for i in range(10)}
    r = c.http.post("/api/kernels", json={"env": many})
    assert r.status_code == 400, r.text
    assert "bytes together" in r.json()["message"]
    # The attack of issue 13: one 17 MiB value, once a frame that disconnected every host.
    r = c.http.post("/api/kernels", json={"env": {"KERNEL_X": "x" * 17 * 2**20}})
    assert r.status_code == 413, r.text
    assert "max_body_bytes" in r.json()["message"]
    assert c.http.get("/api/kernels").json() == []
    _hosts_stay_connected(c)


def test_a_huge_declared_body_is_refused_before_it_is_read(cluster: Cluster) -> None:
    c = cluster
    with _connect(c) as sock:
        sock.sendall(
            b"POST /api/kernels HTTP/1.1\r\nhost: x\r\nauthorization: token "
            + c.token.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(10 * 2**30).encode()
            + b"\r\n\r\n"
            + b"{" * 1024
        )
        answer = _read_until_closed(sock, 10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_body_bytes" in answer
    assert c.http.get("/api").status_code == 200


def test_a_streamed_oversize_body_is_cut_off_early(cluster: Cluster) -> None:
    c = cluster
    sent = 0
    chunk = b"x" * 2**20
    with _connect(c) as sock:
        sock.settimeout(10)
        sock.sendall(
            b"POST /api/jobs/inputs?name=big HTTP/1.1\r\nhost: x\r\nauthorization: token "
            + c.token.encode()
            + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(1024):  # at most 1 GiB; the upload limit is 256 MiB
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError("the gateway read a 1 GiB upload")
    assert sent < 300 * 2**20, sent
    assert c.http.get("/api").status_code == 200


def test_an_oversize_job_source_is_refused_and_nothing_is_stored(cluster: Cluster) -> None:
    c = cluster
    before = c.http.get("/api/jobs").json()
    r = c.http.post("/api/jobs", json={"source": "#" * 5 * 2**20, "retries": 3})
    assert r.status_code == 400, r.text
    assert "source: 5242880 bytes is over the limit of 4194304 bytes" in r.json()["message"]
    assert c.http.get("/api/jobs").json() == before
    _hosts_stay_connected(c)
    r = c.http.post("/api/jobs", json={"source": "print('still here')", "fast": True})
    assert r.status_code == 200, r.text
    assert "still here" in (r.json()["result"] or "")


def test_slow_header_connections_are_closed_while_the_api_answers(cluster: Cluster) -> None:
    c = cluster
    silent = _connect(c)
    partial = _connect(c)
    trickle = _connect(c)
    started = time.monotonic()
    try:
        partial.sendall(b"GET /api HTTP/1.1\r\nhost: x\r\n")  # never the blank line
        trickle.settimeout(5)
        closed = False
        for byte in b"GET /api HTTP/1.1\r\nx-slow: " + b"y" * 200:  # a byte every 0.1 s
            assert c.http.get("/api").status_code == 200
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if time.monotonic() - started > HEADER_TIMEOUT + 5:
                break
            time.sleep(0.1)
        assert closed or _read_until_closed(trickle, 5) == b""
        for sock in (silent, partial):
            assert _read_until_closed(sock, HEADER_TIMEOUT + 5) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT + 10
        assert c.http.get("/api").status_code == 200
    finally:
        for sock in (silent, partial, trickle):
            sock.close()


def test_a_stalled_sse_client_is_dropped_and_no_output_is_lost(cluster: Cluster) -> None:
    c = cluster
    lines, width = 100_000, 120  # 12 MB: under the 16 MiB log cap of the job store
    source = f"for i in range({lines}):\n    print('%0{width - 1}d' % i)\n"
    dropped_before = c.metric("nbcluster_job_subscribers_dropped_total") or 0.0
    job = c.http.post("/api/jobs", json={"source": source}).json()
    sock = _connect(c, rcvbuf=4096)
    try:
        sock.sendall(
            f"GET /api/jobs/{job['id']}/events HTTP/1.1\r\nhost: x\r\n"
            f"authorization: token {c.token}\r\n\r\n".encode()
        )
        # Read nothing: the gateway must drop this subscriber, not buffer the job's output.
        wait_for(
            lambda: (c.metric("nbcluster_job_subscribers_dropped_total") or 0) > dropped_before,
            120,
            "the stalled subscriber to be dropped",
        )
        assert c.http.get("/api").status_code == 200
        received = _read_until_closed(sock, 30)
        assert received.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    wait_for(
        lambda: c.http.get(f"/api/jobs/{job['id']}").json()["status"] == "succeeded",
        120,
        "the job to succeed",
    )

    def whole_log() -> bool:
        return len(c.http.get(f"/api/jobs/{job['id']}/logs").text.splitlines()) >= lines

    wait_for(whole_log, 30, "every line of the job's output in its log")
    log = c.http.get(f"/api/jobs/{job['id']}/logs").text.splitlines()
    assert len(log) == lines
    assert log[-1] == str(lines - 1).zfill(width - 1)
    # A client that keeps up still gets the whole stream.
    with c.http.stream("GET", f"/api/jobs/{job['id']}/events") as events:
        first = next(events.iter_lines())
    assert first.startswith("event: status")
    assert json.loads(c.http.get("/api/cluster/hosts").text)
    _hosts_stay_connected(c)
