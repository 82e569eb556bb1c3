"""Shared pieces of the benchmarks: starting ``nbcluster up`` and printing percentiles."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunningCluster", "percentile", "start_cluster", "summary"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> str:
    return (
        f"p50 {percentile(values, 50) * 1000:7.2f} ms   p99 {percentile(values, 99) * 1000:7.2f} ms"
        f"   (n={len(values)})"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningCluster:
    url: str
    token: str
    process: subprocess.Popen[str]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_cluster(
    state_dir: Path,
    hosts: int = 1,
    replicas: int = 1,
    timeout: float = 90,
    log: Path | None = None,
    extra_args: list[str] | None = None,
) -> RunningCluster:
    """Run the real ``nbcluster up`` and read its URL and token from stdout. Its stderr (the
    logs of the gateway and the hosts) goes to ``log`` if given, else nowhere."""
    port = _free_port()
    stderr = subprocess.DEVNULL if log is None else log.open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "up",
            "--hosts",
            str(hosts),
            "--replicas",
            str(replicas),
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            *(extra_args or []),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "NBCLUSTER_TOKEN": ""},
    )
    if log is not None:
        stderr.close()  # type: ignore[union-attr]  # the child has its own copy
    assert process.stdout is not None
    url = token = None
    deadline = time.monotonic() + timeout
    while (url is None or token is None) and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("nbcluster up exited before it was ready")
        if m := re.match(r"URL: (\S+)", line):
            url = m.group(1)
        elif m := re.match(r"TOKEN: (\S+)", line):
            token = m.group(1)
    if url is None or token is None:
        process.kill()
        raise RuntimeError("nbcluster up did not print its URL and token in time")
    return RunningCluster(url, token, process)
