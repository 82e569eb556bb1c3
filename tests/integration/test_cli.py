"""The ``nbcluster`` command line as an operator uses it: ``up`` (and stopping it, gently or
not), ``status`` reading the runtime file, and the errors of misused commands."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..cluster import free_port, processes_mentioning, wait_for

pytestmark = pytest.mark.integration

NBCLUSTER = [sys.executable, "-m", "nbcluster"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any NBCLUSTER_* variable the test run may have."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def nbcluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NBCLUSTER, *args],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


class Up:
    """A running ``nbcluster up``; its stdout is read line by line by a thread."""

    def __init__(self, state_dir: Path, port: int, token: str, log: Path) -> None:
        self.state_dir = state_dir
        self.url = f"http://127.0.0.1:{port}"
        self.token = token
        self.log = log
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [
                *NBCLUSTER,
                "up",
                "--hosts",
                "2",
                "--gpus-per-host",
                "3",
                "--port",
                str(port),
                "--token",
                token,
                "--state-dir",
                str(state_dir),
            ],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"token {token}"}, timeout=30
        )

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_banner(self, timeout: float = 60) -> dict[str, str]:
        """The ``KEY: value`` lines ``up`` prints on stdout once everything is up."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while "CONNECT" not in found:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"nbcluster up printed no banner; found {found}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            key, sep, value = line.partition(": ")
            if sep and key in ("URL", "TOKEN", "CONNECT"):
                found[key] = value.strip()
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.http.close()
        self._stderr.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory; no process mentioning it may be left at the end."""
    path = (tmp_path / "state").resolve()
    yield path
    deadline = time.monotonic() + 15
    while processes_mentioning(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = processes_mentioning(path)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


@pytest.fixture
def up(state_dir: Path, tmp_path: Path) -> Iterator[Up]:
    running = Up(state_dir, free_port(), "T0ken-for-tests", tmp_path / "up.stderr")
    try:
        yield running
    finally:
        running.close()


def start_kernel(up: Up) -> int:
    """Start a kernel through the REST API; returns its replica's pid."""
    response = up.http.post("/api/kernels", json={})
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    [kernel] = [k for k in up.http.get("/api/cluster/kernels").json() if k["id"] == kernel_id]
    pid: int = kernel["replicas"][0]["pid"]
    return pid


def everything_gone(state_dir: Path) -> bool:
    return not processes_mentioning(state_dir)


def test_up_status_and_sigterm(up: Up, state_dir: Path) -> None:
    banner = up.wait_for_banner()
    assert banner["URL"] == up.url
    assert banner["TOKEN"] == up.token
    # The token by environment, never on JupyterLab's command line.
    assert banner["CONNECT"] == (
        f"env JUPYTER_GATEWAY_AUTH_TOKEN={up.token} jupyter lab --gateway-url={up.url}"
    )
    replica = start_kernel(up)
    # up itself, the gateway, two hosts and one replica: all name the state directory
    running = {p.pid for p in processes_mentioning(state_dir)}
    assert len(running) == 5
    assert {up.proc.pid, replica} < running

    status = nbcluster("status", "--state-dir", str(state_dir))
    assert status.returncode == 0, status.stderr
    assert "host-1" in status.stdout
    assert "host-2" in status.stdout
    assert "3 (virtual)" in status.stdout
    assert "python3" in status.stdout

    as_json = nbcluster("status", "--state-dir", str(state_dir), "--json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert sorted(h["name"] for h in parsed["hosts"]) == ["host-1", "host-2"]
    assert all(h["state"] == "connected" and len(h["gpus"]) == 3 for h in parsed["hosts"])
    assert len(parsed["kernels"]) == 1
    assert parsed["kernels"][0]["replicas"][0]["state"] == "running"

    logged_before_stop = up.log.stat().st_size
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(30) == 0
    wait_for(lambda: everything_gone(state_dir), 10, "every cluster process to exit")
    # Stopping is quiet: the gateway stops before its hosts, so it neither reports their
    # replicas lost nor tries to restore the kernel, and the hosts do not warn that the
    # gateway went away.
    stopping = up.log.read_bytes()[logged_before_stop:].decode(errors="replace")
    assert "ERROR" not in stopping and "WARNING" not in stopping, stopping
    assert "nbcluster stopped." in stopping
    # The runtime file went with the gateway: status no longer finds one.
    after = nbcluster("status", "--state-dir", str(state_dir))
    assert after.returncode != 0
    assert "no running gateway" in after.stderr
    # Its kernels stopped with it, so it forgot them: the next `up` starts clean.
    assert list((state_dir / "gateway" / "kernels").glob("*.json")) == []


def test_sigkill_of_up_takes_everything_down(up: Up, state_dir: Path) -> None:
    up.wait_for_banner()
    replica = start_kernel(up)
    running = {p.pid for p in processes_mentioning(state_dir)}
    assert len(running) == 5
    assert {up.proc.pid, replica} < running

    up.proc.kill()
    up.proc.wait(10)
    wait_for(lambda: everything_gone(state_dir), 10, "every cluster process to exit")


def test_up_on_a_busy_port_fails_fast(state_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = nbcluster("up", "--hosts", "1", "--port", str(port), "--state-dir", str(state_dir))
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert f"port {port}" in result.stderr
    assert "in use" in result.stderr


def test_host_with_a_bad_gateway_url(state_dir: Path) -> None:
    join_token = state_dir / "join-token"
    state_dir.mkdir(parents=True, exist_ok=True)
    join_token.write_text("nbj_t")
    join_token.chmod(0o600)
    result = nbcluster(
        "host",
        "--gateway",
        "notaurl",
        "--join-token-file",
        str(join_token),
        "--state-dir",
        str(state_dir),
    )
    assert result.returncode == 2
    assert "'notaurl' is not an http(s) URL" in result.stderr
    assert "--gateway" in result.stderr


def test_status_without_a_running_gateway(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    result = nbcluster("status", env=clean_env(NBCLUSTER_STATE_DIR=str(empty)))
    assert result.returncode == 2
    assert "no running gateway found" in result.stderr
    assert "Traceback" not in result.stderr

    # A runtime file left by a gateway that was killed: the URL it names does not answer.
    stale = tmp_path / "stale"
    (stale / "gateway").mkdir(parents=True)
    url = f"http://127.0.0.1:{free_port()}"
    (stale / "gateway" / "runtime.json").write_text(
        json.dumps({"url": url, "token": "t", "pid": 1})
    )
    result = nbcluster("status", "--state-dir", str(stale))
    assert result.returncode == 1
    assert f"cannot reach the gateway at {url}" in result.stderr
    assert "Traceback" not in result.stderr
