"""LocalProcessHostProvider with real child processes running a stand-in for the host daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nbcluster.gateway import HostProvider, HostProviderError, LocalProcessHostProvider

TOKEN = "s3cret-token-for-tests"

# A stand-in host daemon: records its argv, pid and token next to itself under its --name, then
# waits for SIGTERM (or, with IGNORE_TERM, notes SIGTERM and keeps going); exits by itself
# after 30 s so that a failed test leaves nothing behind for long.
STAND_IN = """
import json, os, signal, sys, time
from pathlib import Path

IGNORE_TERM = {ignore_term}
here = Path(__file__).parent
name = sys.argv[sys.argv.index("--name") + 1]

def on_term(signum, frame):
    if IGNORE_TERM:
        (here / (name + ".term")).write_text("got SIGTERM")
    else:
        sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
record = {{"argv": sys.argv, "pid": os.getpid(), "token": os.environ.get("NBCLUSTER_JOIN_TOKEN"), "admin": os.environ.get("NBCLUSTER_TOKEN")}}
tmp = here / (name + ".tmp")
tmp.write_text(json.dumps(record))
tmp.rename(here / (name + ".json"))
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def record_of(tmp_path: Path, name: str) -> dict[str, Any]:
    """What the stand-in called ``name`` recorded, once it has (its SIGTERM handler is set)."""
    path = tmp_path / f"{name}.json"
    await wait_until(path.exists)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write_stand_in(tmp_path: Path, ignore_term: bool = False) -> Path:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN.format(ignore_term=ignore_term))
    return script


def make_provider(tmp_path: Path, script: Path, **kwargs: Any) -> LocalProcessHostProvider:
    return LocalProcessHostProvider(
        gateway_url="http://127.0.0.1:8889",
        join_token=TOKEN,
        state_dir=tmp_path / "state",
        gpus_per_host=2,
        argv_prefix=[sys.executable, str(script)],
        **kwargs,
    )


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalProcessHostProvider]:
    p = make_provider(tmp_path, write_stand_in(tmp_path), stop_grace=5.0)
    try:
        yield p
    finally:
        await p.close(grace=0.5)


def test_satisfies_protocol(tmp_path: Path) -> None:
    p = make_provider(tmp_path, tmp_path / "unused.py")
    assert isinstance(p, HostProvider)
    assert p.name == "local"
    assert issubclass(HostProviderError, RuntimeError)


def test_default_command_is_nbcluster(tmp_path: Path) -> None:
    p = LocalProcessHostProvider("http://gw:1", TOKEN, tmp_path, gpus_per_host=0)
    argv = p.argv("auto-1")
    assert argv[:4] == [sys.executable, "-m", "nbcluster", "host"]
    assert TOKEN not in argv


async def test_start_names_argv_and_token(
    provider: LocalProcessHostProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCLUSTER_TOKEN", "the-admin-token")
    assert await provider.start_hosts(2) == ["auto-1", "auto-2"]
    assert provider.started() == ["auto-1", "auto-2"]
    assert provider.owns("auto-1") and provider.owns("auto-2")
    assert not provider.owns("auto-3") and not provider.owns("host-1")

    record = await record_of(tmp_path, "auto-2")
    argv: list[str] = record["argv"]
    assert argv[1] == "host"
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options == {
        "--gateway": "http://127.0.0.1:8889",
        "--name": "auto-2",
        "--gpus": "2",
        "--state-dir": str(tmp_path / "state"),
        "--log-level": "warning",
        "--parent-pid": str(os.getpid()),
    }
    assert record["token"] == TOKEN
    # The join token only: an admin token in the gateway's environment stays there.
    assert record["admin"] is None
    assert all(TOKEN not in arg for arg in argv)

    # Numbers keep counting up, even after a host has gone.
    await provider.stop_host("auto-1")
    assert await provider.start_hosts(1) == ["auto-3"]
    assert await provider.start_hosts(0) == []


async def test_stop_host_ends_the_process(
    provider: LocalProcessHostProvider, tmp_path: Path
) -> None:
    await provider.start_hosts(2)
    pid = (await record_of(tmp_path, "auto-1"))["pid"]
    other = (await record_of(tmp_path, "auto-2"))["pid"]
    await asyncio.wait_for(provider.stop_host("auto-1"), 10)
    assert not alive(pid)
    assert provider.started() == ["auto-2"]
    assert provider.owns("auto-1")
    assert alive(other)
    # Stopping a host that has already gone is a no-op.
    await provider.stop_host("auto-1")


async def test_unknown_name_raises(provider: LocalProcessHostProvider) -> None:
    with pytest.raises(HostProviderError, match="nope"):
        await provider.stop_host("nope")
    await provider.start_hosts(1)
    with pytest.raises(HostProviderError):
        await provider.stop_host("auto-2")


async def test_sigterm_ignored_then_killed_after_grace(tmp_path: Path) -> None:
    p = make_provider(tmp_path, write_stand_in(tmp_path, ignore_term=True), stop_grace=30.0)
    try:
        await p.start_hosts(1)
        pid = (await record_of(tmp_path, "auto-1"))["pid"]
        began = time.monotonic()
        await asyncio.wait_for(p.stop_host("auto-1", grace=0.5), 10)
        took = time.monotonic() - began
        assert not alive(pid)
        assert (tmp_path / "auto-1.term").exists()  # it was asked first
        assert 0.5 <= took < 10
        assert p.started() == []
    finally:
        await p.close(grace=0.1)


async def test_grace_from_constructor(tmp_path: Path) -> None:
    p = make_provider(tmp_path, write_stand_in(tmp_path, ignore_term=True), stop_grace=0.3)
    try:
        await p.start_hosts(1)
        pid = (await record_of(tmp_path, "auto-1"))["pid"]
        await asyncio.wait_for(p.stop_host("auto-1"), 10)
        assert not alive(pid)
    finally:
        await p.close(grace=0.1)


async def test_close_leaves_no_child(tmp_path: Path) -> None:
    p = make_provider(tmp_path, write_stand_in(tmp_path), stop_grace=5.0)
    names = await p.start_hosts(3)
    pids = [(await record_of(tmp_path, n))["pid"] for n in names]
    assert all(alive(pid) for pid in pids)
    await asyncio.wait_for(p.close(), 15)
    assert not any(alive(pid) for pid in pids)
    assert p.started() == []
    with pytest.raises(HostProviderError, match="closed"):
        await p.start_hosts(1)


async def test_close_kills_children_that_ignore_sigterm(tmp_path: Path) -> None:
    p = make_provider(tmp_path, write_stand_in(tmp_path, ignore_term=True), stop_grace=0.3)
    names = await p.start_hosts(2)
    pids = [(await record_of(tmp_path, n))["pid"] for n in names]
    await asyncio.wait_for(p.close(), 10)
    assert not any(alive(pid) for pid in pids)
    assert p.started() == []


async def test_child_exiting_on_its_own_is_forgotten(
    provider: LocalProcessHostProvider, tmp_path: Path
) -> None:
    await provider.start_hosts(2)
    pid = (await record_of(tmp_path, "auto-1"))["pid"]
    os.kill(pid, signal.SIGTERM)  # not through the provider
    await wait_until(lambda: provider.started() == ["auto-2"])
    await wait_until(lambda: not alive(pid))  # reaped, not a zombie
    assert provider.owns("auto-1")
    await provider.stop_host("auto-1")  # already gone: nothing to do


async def test_command_that_cannot_start_raises(tmp_path: Path) -> None:
    p = LocalProcessHostProvider(
        "http://127.0.0.1:8889",
        TOKEN,
        tmp_path,
        gpus_per_host=1,
        argv_prefix=[str(tmp_path / "no-such-program")],
    )
    with pytest.raises(HostProviderError, match="cannot start host daemon auto-1"):
        await p.start_hosts(1)
    assert p.started() == []
    await p.close()


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalProcessHostProvider("http://gw:1", TOKEN, tmp_path, gpus_per_host=-1)
    with pytest.raises(ValueError):
        LocalProcessHostProvider("http://gw:1", TOKEN, tmp_path, 1, argv_prefix=[])
