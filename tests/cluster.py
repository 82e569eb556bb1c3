"""A whole nbcluster on loopback for integration tests: a gateway process and host daemon
processes, started with the real CLI, stopped (and checked for leftovers) at the end."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from nbcluster._net import CLIENT_KEEPALIVE_EXPIRY

from .tls_files import TlsFiles

__all__ = [
    "Cluster",
    "async_wait_for",
    "free_port",
    "process_gone",
    "processes_mentioning",
    "running_cluster",
    "wait_for",
]


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what} (last error: {last_error})"
    )


async def async_wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """:func:`wait_for` for async tests: the event loop keeps running between polls, so
    websocket clients keep reading. ``condition`` may be a plain or an async function."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        await asyncio.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what} (last error: {last_error})"
    )


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_mentioning(text: str | Path) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose command line mentions ``text``, e.g. a state
    directory: the gateway, host daemons and replicas of a cluster all have it in theirs."""
    needle = str(text)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        cmdline = proc.info.get("cmdline") or []
        if any(needle in part for part in cmdline):
            found.append(proc)
    return found


class Cluster:
    """``Cluster(tmp_path, hosts=2).start()``; ``stop()`` ends every process it started."""

    def __init__(
        self,
        state_dir: Path,
        hosts: int = 2,
        gpus_per_host: int = 2,
        token: str = "test-token",
        host_lost_timeout: float = 3.0,
        heartbeat_interval: float = 0.5,
        replicas: int = 1,
        ip: str = "127.0.0.1",
        gateway_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
        host_args: Sequence[str] = (),
    ) -> None:
        self.state_dir = state_dir
        #: More ``nbcluster host`` flags, for every host (``--container-runtime docker`` ...).
        self.host_args = list(host_args)
        #: The gateway serves https/wss with ``tls.cert``; hosts verify it with ``tls.ca``.
        self.tls = tls
        #: The address the gateway listens on (hosts in other network namespaces need one
        #: they can reach, e.g. a bridge's).
        self.ip = ip
        self.replicas_per_kernel = replicas
        #: More ``nbcluster gateway`` flags (policy, auto-scaling ...).
        self.gateway_args = list(gateway_args)
        self.n_hosts = hosts
        self.gpus_per_host = gpus_per_host
        self.token = token
        #: What host daemons join with (the gateway reads it too, from its environment).
        self.join_token = "test-join-token"
        self.port = free_port(ip)
        self.url = f"{'https' if tls else 'http'}://{ip}:{self.port}"
        self.host_lost_timeout = host_lost_timeout
        self.heartbeat_interval = heartbeat_interval
        self.gateway: subprocess.Popen[bytes] | None = None
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}
        self.http = self._client()
        self.log_dir = state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "NBCLUSTER_TOKEN": self.token,
            "NBCLUSTER_JOIN_TOKEN": self.join_token,
            "PYTHONUNBUFFERED": "1",
        }

    def _spawn(
        self, name: str, args: list[str], prefix: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "nbcluster", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def start_gateway(self) -> None:
        """Start the gateway and wait until it answers. ``free_port`` only found the port free:
        another process can take it before the gateway binds it (seen under load). Then the
        gateway exits at once; it is started again, on a new port when nothing knows this
        one yet (no host, not in its arguments), else on the same one (at most 3 tries)."""
        log = self.log_dir / "gateway.log"
        for attempt in range(3):
            offset = log.stat().st_size if log.exists() else 0
            self._spawn_gateway()
            assert self.gateway is not None
            gateway = self.gateway
            wait_for(self._answers_or_exited, 30, "the gateway to answer")
            if gateway.poll() is None:
                return
            with log.open("rb") as f:
                f.seek(offset)
                said = f.read().decode(errors="replace")
            if "address already in use" not in said or attempt == 2:
                raise AssertionError(f"the gateway exited ({gateway.returncode}):\n{said[-3000:]}")
            if not self.hosts and str(self.port) not in " ".join(self.gateway_args):
                self._move_to(free_port(self.ip))
            else:
                time.sleep(1)  # hosts know this port: wait for whoever holds it to let go

    def _answers_or_exited(self) -> bool:
        assert self.gateway is not None
        if self.gateway.poll() is not None:
            return True  # exited: start_gateway looks at why
        return self.http.get("/api", timeout=5).status_code == 200

    def _move_to(self, port: int) -> None:
        self.http.close()
        self.port = port
        self.url = f"{'https' if self.tls else 'http'}://{self.ip}:{port}"
        self.http = self._client()

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"token {self.token}"},
            timeout=60,
            verify=ssl.create_default_context(cafile=self.tls.ca) if self.tls else True,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY),
        )

    def _spawn_gateway(self) -> None:
        self.gateway = self._spawn(
            "gateway",
            [
                "gateway",
                "--ip",
                self.ip,
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
                "--host-lost-timeout",
                str(self.host_lost_timeout),
                "--heartbeat-interval",
                str(self.heartbeat_interval),
                "--replicas",
                str(self.replicas_per_kernel),
                "--log-level",
                "debug",
                *self.gateway_args,
                *(
                    ["--certfile", str(self.tls.cert), "--keyfile", str(self.tls.key)]
                    if self.tls
                    else []
                ),
            ],
        )

    def start_host(
        self,
        name: str,
        address: str | None = None,
        prefix: Sequence[str] = (),
        ca: Path | bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        """Start a host daemon; ``address`` is its ``--address`` (where its replicas listen),
        ``prefix`` goes before the command (e.g. ``ip netns exec NS``, which execs it).
        ``ca``: the ``--ca`` it verifies a TLS gateway with (True: the cluster's CA, False:
        none, the system's trust store). ``extra``: more flags for this host only
        (``--pool a``)."""
        flags = list(extra)
        extra = ["--address", address] if address is not None else []
        if ca is True and self.tls is not None:
            extra += ["--ca", str(self.tls.ca)]
        elif isinstance(ca, Path):
            extra += ["--ca", str(ca)]
        self.hosts[name] = self._spawn(
            name,
            [
                "host",
                "--gateway",
                self.url,
                "--name",
                name,
                "--state-dir",
                str(self.state_dir),
                "--gpus",
                str(self.gpus_per_host),
                "--log-level",
                "debug",
                *self.host_args,
                *extra,
                *flags,
            ],
            prefix,
        )

    def connected_hosts(self) -> list[str]:
        return [
            h["name"]
            for h in self.http.get("/api/cluster/hosts").json()
            if h["state"] == "connected"
        ]

    def start(self) -> Cluster:
        self.start_gateway()
        for i in range(self.n_hosts):
            self.start_host(f"host-{i + 1}")
        wait_for(lambda: len(self.connected_hosts()) == self.n_hosts, 30, "hosts to connect")
        return self

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.kill()
        self.gateway.wait(10)

    def kill_host(self, name: str) -> None:
        proc = self.hosts[name]
        proc.kill()
        proc.wait(10)

    def kernel_summary(self, kernel_id: str) -> dict[str, object]:
        for k in self.http.get("/api/cluster/kernels").json():
            if k["id"] == kernel_id:
                return dict(k)
        raise KeyError(kernel_id)

    def replicas(self, kernel_id: str) -> list[dict[str, Any]]:
        """The kernel's replicas as ``/api/cluster/kernels`` lists them (host, state, pid ...)."""
        replicas = self.kernel_summary(kernel_id)["replicas"]
        assert isinstance(replicas, list)
        return replicas

    def state_record(self, kernel_id: str) -> dict[str, Any]:
        """The gateway's persisted record of a kernel (it holds the key and replica ports)."""
        path = self.state_dir / "gateway" / "kernels" / f"{kernel_id}.json"
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """``/metrics`` as {(sample name, labels): value}; see :meth:`metric`."""
        text = self.http.get("/metrics").text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of ``/metrics`` by its name and labels (``None`` if absent)."""
        return self.metrics().get((name, frozenset(labels.items())))

    def logs(self) -> str:
        return "\n".join(
            f"===== {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        procs = [p for p in (*self.hosts.values(), self.gateway) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.http.close()


@contextlib.contextmanager
def running_cluster(state_dir: Path, **options: Any) -> Iterator[Cluster]:
    """Start a :class:`Cluster`, yield it, stop it, and fail if any of its processes remain.

    The ``cluster`` fixtures (function- and module-scoped) are built on this.
    """
    c = Cluster(state_dir, **options)
    try:
        c.start()
    except BaseException:
        print(c.logs())
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()
    leftovers = processes_mentioning(state_dir)
    if leftovers:
        for proc in leftovers:
            proc.kill()
        raise AssertionError(f"processes left behind: {[p.info['cmdline'] for p in leftovers]}")
