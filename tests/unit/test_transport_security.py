"""The pieces of encrypted transport (docs/security.md, "Encrypted transport"), in-process:
TLS helpers, the loud warning, the CurveZMQ keys in the host protocol, a ReplicaLink to a
CURVE server, and the host daemon writing the keys into the connection file."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import sys
from pathlib import Path

import pydantic
import pytest
import zmq

from nbcluster import _curve
from nbcluster._tls import (
    TlsConfigError,
    check_server_files,
    client_context,
    is_loopback,
    unverified_reason,
)
from nbcluster.gateway import GatewayConfig
from nbcluster.gateway._replica import ReplicaLink
from nbcluster.gateway._server import clear_text_warnings
from nbcluster.host._processes import ReplicaStartError, ReplicaSupervisor
from nbcluster.hostproto import ConnectionInfo, ReplicaExited, StartReplica
from nbcluster.protocol import Message, Signer, encode_zmq, new_message

from ..tls_files import make_tls_files

KEY = b"kernel-key"


def test_loopback_names() -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "x.localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "gateway.example.org", "[fe80::1]"):
        assert not is_loopback(host), host


def test_tls_files_are_checked_and_named(tmp_path: Path) -> None:
    good = make_tls_files(tmp_path / "a", label="a")
    other = make_tls_files(tmp_path / "b", label="b")
    check_server_files(good.cert, good.key)
    with pytest.raises(TlsConfigError, match=r"cannot use the certificate .*a-server\.pem"):
        check_server_files(good.cert, other.key)
    assert isinstance(client_context(good.ca), ssl.SSLContext)
    assert client_context(None).verify_mode == ssl.CERT_REQUIRED
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match=r"cannot read the CA file .*not-a-ca\.pem"):
        client_context(not_pem)


def test_unverified_reason_is_found_in_the_cause_chain() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    try:
        try:
            raise failure
        except ssl.SSLError as exc:
            raise OSError("connect failed") from exc
    except OSError as wrapped:
        assert unverified_reason(wrapped) == "unable to get local issuer certificate"
    assert unverified_reason(OSError("refused")) is None


def test_listening_beyond_loopback_without_tls_is_warned(tmp_path: Path) -> None:
    assert clear_text_warnings(GatewayConfig(token="t")) == []
    [warning] = clear_text_warnings(GatewayConfig(token="t", ip="0.0.0.0"))
    assert "WITHOUT TLS" in warning and "--certfile" in warning
    tls = make_tls_files(tmp_path)
    secure = GatewayConfig(token="t", ip="0.0.0.0", certfile=tls.cert, keyfile=tls.key)
    assert secure.scheme == "https" and clear_text_warnings(secure) == []
    [curve_off] = clear_text_warnings(
        GatewayConfig(token="t", ip="10.1.2.3", certfile=tls.cert, keyfile=tls.key, curve=False)
    )
    assert "--no-curve" in curve_off


def test_curve_keys_in_the_host_protocol_are_checked_and_not_shown() -> None:
    secret = _curve.new_server_secret()
    start = StartReplica(
        request_id="r", kernel_id="k", replica_id="k-1", argv=["x"], key="h", curve_secretkey=secret
    )
    assert secret not in repr(start)
    assert StartReplica.model_validate_json(start.model_dump_json()).curve_secretkey == secret
    with pytest.raises(pydantic.ValidationError, match="curve_secretkey"):
        StartReplica(
            request_id="r",
            kernel_id="k",
            replica_id="k-1",
            argv=["x"],
            key="h",
            curve_secretkey="x",
        )
    public = _curve.public_key_of(secret)
    info = ConnectionInfo(
        ip="127.0.0.1",
        shell_port=1,
        iopub_port=2,
        stdin_port=3,
        control_port=4,
        hb_port=5,
        curve_publickey=public,
    )
    assert public not in repr(info)


class CurveReplica:
    """A replica's five sockets as CURVE servers on loopback (as ipykernel makes them)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.secret = _curve.new_server_secret()
        self.public = _curve.public_key_of(self.secret)
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        ports = {}
        for name, kind in (
            ("shell", zmq.ROUTER),
            ("control", zmq.ROUTER),
            ("stdin", zmq.ROUTER),
            ("iopub", zmq.PUB),
            ("hb", zmq.REP),
        ):
            sock = context.socket(kind)
            sock.linger = 0
            sock.curve_secretkey = self.secret.encode()
            sock.curve_publickey = self.public.encode()
            sock.curve_server = True
            ports[name] = sock.bind_to_random_port("tcp://127.0.0.1")
            self.sockets[name] = sock
        self.connection = ConnectionInfo(
            ip="127.0.0.1",
            shell_port=ports["shell"],
            control_port=ports["control"],
            stdin_port=ports["stdin"],
            iopub_port=ports["iopub"],
            hb_port=ports["hb"],
            curve_publickey=self.public,
        )


async def _recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError from None
            await asyncio.sleep(0.01)


async def test_a_replica_link_speaks_curve_and_a_keyless_subscriber_hears_nothing() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    replica = CurveReplica(context)
    received: list[Message] = []
    link = ReplicaLink(
        context,
        "k-1",
        replica.connection,
        Signer(KEY),
        lambda _link, msg: received.append(msg),
        lambda *_: None,
    )
    link.open()
    spy = context.socket(zmq.SUB)
    spy.linger = 0
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.connect(f"tcp://127.0.0.1:{replica.connection.iopub_port}")
    try:
        # shell: the gateway's request reaches the CURVE server and its reply comes back
        link.send(new_message("shell", "kernel_info_request", {}))
        identity, *_ = await _recv(replica.sockets["shell"])
        reply = new_message("shell", "kernel_info_reply", {"status": "ok"})
        replica.sockets["shell"].send_multipart([identity, *encode_zmq(reply, Signer(KEY))])
        # iopub: published after both subscribers had time to connect
        await asyncio.sleep(0.5)
        output = new_message("iopub", "stream", {"name": "stdout", "text": "secret"})
        for _ in range(5):
            replica.sockets["iopub"].send_multipart(encode_zmq(output, Signer(KEY)))
            await asyncio.sleep(0.05)
        for _ in range(100):
            if {m.msg_type for m in received} >= {"kernel_info_reply", "stream"}:
                break
            await asyncio.sleep(0.02)
        assert {m.msg_type for m in received} >= {"kernel_info_reply", "stream"}
        ping = asyncio.create_task(link.ping(2.0))
        beat = await _recv(replica.sockets["hb"])
        replica.sockets["hb"].send_multipart(beat)
        assert await ping
        with pytest.raises(zmq.Again):
            spy.recv_multipart(zmq.NOBLOCK)
    finally:
        link.close()
        context.destroy(linger=0)


#: A stand-in replica: reports its ports (and whether it serves CURVE) as the real app does.
FAKE_REPLICA = """
import json, os, sys, time
info = json.load(open(sys.argv[1]))
report = {k: 1 for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
report["curve"] = "curve_secretkey" in info and sys.argv[2] == "serves"
with os.fdopen(int(os.environ["NBCLUSTER_REPORT_FD"]), "w") as pipe:
    pipe.write(json.dumps(report) + "\\n")
time.sleep(60)
"""


async def _exits(event: ReplicaExited) -> None:
    pass


async def test_the_host_writes_curve_keys_only_into_the_connection_file(tmp_path: Path) -> None:
    supervisor = ReplicaSupervisor(
        address="127.0.0.1",
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "logs",
        default_working_dir=tmp_path,
        on_exit=_exits,
        gateway_env={"NBCLUSTER_GATEWAY_URL": "https://gw:8889"},
    )
    secret = _curve.new_server_secret()

    def request(replica_id: str, serves: str) -> StartReplica:
        return StartReplica(
            request_id="r",
            kernel_id="k",
            replica_id=replica_id,
            argv=[sys.executable, "-c", FAKE_REPLICA, "{connection_file}", serves],
            env={"NBCLUSTER_GATEWAY_URL": "http://127.0.0.1:8889"},
            key="hmac",
            curve_secretkey=secret,
            launch_timeout=20,
        )

    try:
        replica = await supervisor.start(request("k-1", "serves"))
        assert replica.connection.curve_publickey == _curve.public_key_of(secret)
        path = tmp_path / "run" / "kernel-k-1.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        info = json.loads(path.read_text())
        assert info["curve_secretkey"] == secret
        assert info["curve_publickey"] == replica.connection.curve_publickey
        proc = Path(f"/proc/{replica.pid}")
        cmdline = (await asyncio.to_thread((proc / "cmdline").read_bytes)).decode()
        environ = (await asyncio.to_thread((proc / "environ").read_bytes)).decode()
        assert secret not in cmdline and secret not in environ
        # The replica reaches the gateway as its host does.
        assert "NBCLUSTER_GATEWAY_URL=https://gw:8889" in environ.split("\0")
        with pytest.raises(ReplicaStartError, match="does not serve CurveZMQ"):
            await supervisor.start(request("k-2", "plain"))
    finally:
        await supervisor.stop_all(grace=0.5)
    assert os.listdir(tmp_path / "run") == []
