"""Fixtures shared by unit tests."""

from __future__ import annotations

import decimal
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..cluster import free_port, wait_for


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port (credentials: "test"), for the S3 tests."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "the moto server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def shells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """Two IPython shells in this process, an executor and a follower; the random generator
    and decimal context they change are put back afterwards."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    executor, follower = InteractiveShell(config=config), InteractiveShell(config=config)
    saved_random = random.getstate()
    saved_decimal = decimal.getcontext().copy()
    try:
        yield executor, follower
    finally:
        random.setstate(saved_random)
        decimal.setcontext(saved_decimal)
        follower.cleanup()
        executor.cleanup()
