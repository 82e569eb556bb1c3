"""The ssh host provider against a real sshd (``tests/sshd.py``): several "machines" are one
sshd on loopback addresses 127.0.0.1-3. It starts host daemons over ssh that register with a
real gateway and run a replicated kernel; a host daemon killed on its machine is started
again and the kernel keeps its variables; every value that reaches the remote command line
arrives as one literal argument; host keys are checked.

Most tests run a fake ``nbcluster`` (a shell script that records its arguments and
environment) at a path full of shell metacharacters: fast, and it shows exactly what a machine
ran. Needs ``/usr/sbin/sshd`` (skipped without it, failed under
``NBCLUSTER_TEST_REQUIRE_SSHD=1``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbcluster.client import GatewayClient
from nbcluster.gateway import HostProviderError
from nbcluster.gateway._ssh_provider import SshHostProvider

from ..cluster import Cluster, async_wait_for, process_gone, processes_mentioning, wait_for
from ..sshd import Sshd, keygen, require_sshd

pytestmark = pytest.mark.integration

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
#: The program host daemons are, on the "machines" (this machine): the venv's entry point.
NBCLUSTER = str(Path(sys.executable).parent / "nbcluster")

#: Records its arguments (one per line, NUL-terminated) and its NBCLUSTER_* environment
#: next to itself, says hello on stderr, then runs until stopped, or exits with $FAKE_EXIT.
FAKE = """#!/bin/sh
out="$(dirname "$0")/run.$$"
for arg in "$@"; do printf '%s\\0' "$arg"; done > "$out.argv"
printf '%s' "$NBCLUSTER_JOIN_TOKEN" > "$out.token"
echo "fake host daemon $$ says hello" >&2
if [ -f "$(dirname "$0")/exit-code" ]; then exit "$(cat "$(dirname "$0")/exit-code")"; fi
exec sleep 600
"""


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    require_sshd()
    server = Sshd(tmp_path / "sshd", addresses=ADDRESSES)
    with server:
        yield server
    # Whatever the test did, what ran through sshd is gone (Sshd.stop kills leftovers;
    # the tests themselves check that the provider stopped its daemons).


def _fake(directory: Path) -> Path:
    """The fake ``nbcluster`` at a path a shell would split, expand and run commands from."""
    bin_dir = directory / "bin $(touch PWN-dir) `touch PWN-tick` ;touch PWN-semi & 'q\" *"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "nbclu$ster"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    return fake


def _runs(fake: Path) -> dict[int, tuple[list[str], str]]:
    """The fake's runs so far: pid -> (arguments, join token)."""
    found = {}
    for argv_file in fake.parent.glob("run.*.argv"):
        pid = int(argv_file.name.split(".")[1])
        token_file = argv_file.with_suffix(".token")
        if not token_file.exists():
            continue
        args = argv_file.read_bytes().split(b"\0")[:-1]
        found[pid] = ([a.decode() for a in args], token_file.read_text())
    return found


def _pwned(root: Path) -> list[Path]:
    return [p for p in root.rglob("PWN*") if p.is_file()] + list(Path.home().glob("PWN*"))


def _provider(
    sshd: Sshd,
    machines: list[str],
    gateway_url: str = "http://127.0.0.1:9/",
    token: str = "nbj_test-join-token",
    **options: Any,
) -> SshHostProvider:
    """A provider for the fake daemon: quick to restart and to stop."""
    defaults: dict[str, Any] = {
        "known_hosts": sshd.write_known_hosts(sshd.directory / "known_hosts"),
        "client_keys": [sshd.user_key],
        "user": sshd.user,
        "stop_grace": 3.0,
        "restart_backoff": 0.2,
        "connect_timeout": 10.0,
    }
    return SshHostProvider(machines, gateway_url, token, **{**defaults, **options})


async def test_hosts_over_ssh_run_a_kernel_and_a_killed_daemon_is_started_again(
    tmp_path: Path, sshd: Sshd
) -> None:
    cluster = Cluster(tmp_path / "state", hosts=0, replicas=3, gpus_per_host=0)
    cluster.start_gateway()
    port = sshd.ports[0]
    provider = SshHostProvider(
        [f"{sshd.user}@{a}:{port}" for a in ADDRESSES],
        cluster.url,
        cluster.join_token,
        nbcluster=NBCLUSTER,
        known_hosts=sshd.write_known_hosts(tmp_path / "known_hosts"),
        client_keys=[sshd.user_key],
        state_dir=str(cluster.state_dir),
        gpus_per_host=1,
        log_level="info",
        stop_grace=5.0,
        restart_backoff=0.2,
    )
    names = ["ssh-127.0.0.1", "ssh-127.0.0.2", "ssh-127.0.0.3"]
    try:
        assert sorted(await provider.start_hosts(3)) == names
        await async_wait_for(
            lambda: sorted(cluster.connected_hosts()) == names, 45, "the ssh hosts to register"
        )
        hosts = {h["name"]: h for h in cluster.http.get("/api/cluster/hosts").json()}
        pids = {s.name: s.pid for s in provider.status()}
        for name, address in zip(names, ADDRESSES, strict=True):
            # Each daemon listens at the address its machine was reached at.
            assert hosts[name]["address"] == address
            daemon = psutil.Process(pids[name])
            cmdline = daemon.cmdline()
            assert cmdline[cmdline.index("--name") + 1] == name
            # The join token went through the channel into the environment, not argv.
            assert daemon.environ()["NBCLUSTER_JOIN_TOKEN"] == cluster.join_token
            assert not any(cluster.join_token in part for part in cmdline)
        with pytest.raises(HostProviderError, match="every ssh machine already runs"):
            await provider.start_hosts(1)

        async with GatewayClient(cluster.url, cluster.token) as gw:
            kernel = await gw.start_kernel()
            kid = kernel["id"]
            assert {r["host"] for r in cluster.replicas(kid)} == set(names)
            async with gw.channels(kid) as channels:
                result = await channels.execute("x = 41\ndef f(v):\n    return v + x", 60)
                assert result.status == "ok", result.reply
                executor = cluster.kernel_summary(kid)["executor"]
                victim = next(r for r in cluster.replicas(kid) if r["replica_id"] == executor)
                old_pid = pids[victim["host"]]
                os.kill(old_pid, signal.SIGKILL)  # the host daemon, on its "machine"
                await async_wait_for(lambda: process_gone(old_pid), 10, "the daemon to die")

                def restarted() -> bool:
                    status = {s.name: s for s in provider.status()}[victim["host"]]
                    return status.restarts == 1 and status.state == "running"

                await async_wait_for(restarted, 20, "the provider to start the daemon again")
                new_pid = {s.name: s.pid for s in provider.status()}[victim["host"]]
                assert new_pid not in (None, old_pid)
                await async_wait_for(
                    lambda: victim["host"] in cluster.connected_hosts(),
                    45,
                    "the restarted daemon to register again",
                )
                # Two replicas survived on the other machines: the kernel kept its state.
                result = await channels.execute("print(f(1))", 60)
                assert result.status == "ok", result.reply
                assert result.stream_text() == "42\n"
            await gw.shutdown_kernel(kid)

        stopped = names[0]
        stopped_pid = {s.name: s.pid for s in provider.status()}[stopped]
        assert stopped_pid is not None
        await provider.stop_host(stopped)
        await async_wait_for(lambda: process_gone(stopped_pid), 10, "the stopped daemon to end")
        assert stopped not in provider.started() and provider.owns(stopped)
        await async_wait_for(
            lambda: stopped not in cluster.connected_hosts(), 15, "the gateway to see it go"
        )
        await provider.close()
        assert provider.started() == []
        gateway_pid = cluster.gateway.pid if cluster.gateway else None
        await async_wait_for(
            lambda: [p.pid for p in processes_mentioning(cluster.state_dir)] == [gateway_pid],
            15,
            "every host daemon and replica to end",
        )
    except BaseException:
        print(cluster.logs(), "\n===== sshd\n", sshd.log())
        raise
    finally:
        await provider.close()
        cluster.stop()
    assert not processes_mentioning(cluster.state_dir)


async def test_every_value_reaches_the_remote_command_as_one_literal_argument(
    tmp_path: Path, sshd: Sshd
) -> None:
    fake = _fake(tmp_path / "remote")
    pwn = tmp_path / "PWN-url"
    hostile = {
        # The gateway URL may hold what a URL may: quoted, never run.
        "gateway_url": f"http://127.0.0.1:9/$(touch${{IFS}}{pwn})?a=`id`;b='c'&d=\"e\"|f",
        "state_dir": f"{tmp_path}/state $(touch PWN-state) ;touch PWN-state2 'x\"y",
        "ca": f"{tmp_path}/ca`touch PWN-ca`.pem",
        "host_args": ["--work-dir", "$(touch PWN-arg) ; touch PWN-arg2 | & > PWN-arg3"],
    }
    token = " nbj_ a'b\"c$(touch PWN-token)`touch PWN-token2`\\d; "
    # Any printable token arrives intact (spaces at both ends included).
    provider = _provider(
        sshd, [f"127.0.0.1:{sshd.ports[0]}"], token=token, nbcluster=str(fake), **hostile
    )
    try:
        (name,) = await provider.start_hosts(1)
        await async_wait_for(lambda: len(_runs(fake)) == 1, 10, "the fake daemon to run")
    finally:
        await provider.close()
    ((pid, (argv, received)),) = _runs(fake).items()
    assert argv == provider.remote_host(name, "127.0.0.1").argv()[1:]
    assert argv == [
        "host", "--gateway", hostile["gateway_url"], "--name", "ssh-127.0.0.1",
        "--address", "127.0.0.1", "--log-level", "warning",
        "--ca", hostile["ca"], "--state-dir", hostile["state_dir"], *hostile["host_args"],
    ]  # fmt: skip
    assert received == token
    assert not _pwned(tmp_path), "an injected command ran"
    await async_wait_for(lambda: process_gone(pid), 10, "the fake daemon to be stopped")

    # The fields with a strict form refuse shell syntax before anything is sent.
    port = sshd.ports[0]
    touch = f"touch {tmp_path}/PWN-refused"
    refused: list[tuple[list[str], dict[str, Any]]] = [
        ([f"127.0.0.1;{touch}:{port}"], {}),
        ([f"$({touch})@127.0.0.1:{port}"], {}),
        ([f"`{touch}`"], {}),
        ([f"-oProxyCommand={touch}"], {}),
        ([f"127.0.0.1:{port}/127.0.0.1;{touch}"], {}),  # the daemon's address
        ([f"127.0.0.1:{port}"], {"user": f"root;{touch}"}),
        ([f"127.0.0.1:{port}"], {"name_prefix": f"x$({touch})"}),  # the host name
        ([f"127.0.0.1:{port}"], {"log_level": f"info;{touch}"}),
        ([f"127.0.0.1:{port}"], {"nbcluster": f"{fake}\n{touch}"}),
        ([f"127.0.0.1:{port}"], {"host_args": [f"--name=x;{touch}"]}),
    ]
    for machines, options in refused:
        with pytest.raises(ValueError):
            _provider(sshd, machines, **{"nbcluster": str(fake), **options})
    with pytest.raises(ValueError, match="join token"):
        _provider(sshd, [f"127.0.0.1:{port}"], token=f"t\n{touch}", nbcluster=str(fake))
    assert not _pwned(tmp_path) and len(_runs(fake)) == 1


async def test_unknown_and_changed_host_keys_are_refused(
    tmp_path: Path, sshd: Sshd, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _fake(tmp_path / "remote")
    port = sshd.ports[0]
    unknown, changed = ("127.0.0.2", port), ("127.0.0.3", port)
    known = sshd.write_known_hosts(tmp_path / "known_hosts", skip=[unknown, changed])
    other_key = keygen(tmp_path / "other_host_key").with_suffix(".pub").read_text().split()
    with known.open("a") as f:
        f.write(sshd.known_hosts_line(*changed, key=" ".join(other_key[:2])) + "\n")
    machines = [f"{a}:{port}" for a in ADDRESSES]

    provider = _provider(sshd, machines[1:2], nbcluster=str(fake), known_hosts=known)
    with pytest.raises(HostProviderError) as refused:
        await provider.start_hosts(1)
    message = str(refused.value)
    assert f"ssh machine 127.0.0.2:{port}: refused: its host key SHA256:" in message
    assert f"is not in {known}" in message and "--ssh-accept-unknown-hosts" in message
    assert provider.started() == [] and _runs(fake) == {}

    # Trust on first use: the unlisted machine is let in, loudly; the changed key never is.
    caplog.set_level(logging.WARNING, logger="nbcluster.gateway._ssh_provider")
    provider = _provider(
        sshd, machines, nbcluster=str(fake), known_hosts=known, accept_unknown_hosts=True
    )
    try:
        started = await provider.start_hosts(3)
        assert sorted(started) == ["ssh-127.0.0.1", "ssh-127.0.0.2"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            "ACCEPTING ITS UNKNOWN HOST KEY SHA256:" in w and f"[127.0.0.2]:{port} ssh-ed25519" in w
            for w in warnings
        ), warnings
        assert any("is NOT the one" in w and "127.0.0.3" in w for w in warnings), warnings
        await async_wait_for(lambda: len(_runs(fake)) == 2, 10, "two fake daemons to run")
        with pytest.raises(HostProviderError, match=r"is NOT the one .* lists for it"):
            await provider.start_hosts(1)
    finally:
        await provider.close()
    assert not _pwned(tmp_path)


async def test_lost_connections_and_crashing_daemons(tmp_path: Path, sshd: Sshd) -> None:
    fake = _fake(tmp_path / "remote")
    provider = _provider(sshd, [f"127.0.0.1:{sshd.ports[0]}"], nbcluster=str(fake), max_restarts=2)
    try:
        (name,) = await provider.start_hosts(1)
        (first,) = [s.pid for s in provider.status()]
        assert first is not None
        # The ssh connection drops: the session's lifeline ends the daemon on the machine,
        # and the provider connects again and starts another.
        slot = provider._by_name[name]
        assert slot.conn is not None
        slot.conn.abort()
        await async_wait_for(lambda: process_gone(first), 10, "the orphaned daemon to end")
        await async_wait_for(
            lambda: provider.status()[0].restarts == 1 and provider.status()[0].pid is not None,
            10,
            "the daemon to be started again",
        )
        assert "no exit status" in (provider.status()[0].last_exit or "")

        # A daemon that cannot stay up is started again max_restarts times, then given up.
        (fake.parent / "exit-code").write_text("3")
        second = provider.status()[0].pid
        assert second is not None
        os.kill(second, signal.SIGTERM)
        await async_wait_for(
            lambda: provider.status()[0].state == "failed", 15, "the provider to give up"
        )
        assert provider.started() == []
        assert "exited with code 3: fake host daemon" in (provider.status()[0].last_exit or "")
        # A later scale-out may pick the machine again.
        (fake.parent / "exit-code").unlink()
        assert await provider.start_hosts(1) == [name]
    finally:
        await provider.close()

    # nbcluster not there: a clear error, nothing left running.
    provider = _provider(
        sshd, [f"127.0.0.1:{sshd.ports[0]}"], nbcluster=str(tmp_path / "no" / "nbcluster")
    )
    with pytest.raises(HostProviderError, match=r"exited with code 127: nbcluster-ssh: cannot run"):
        await provider.start_hosts(1)
    assert provider.started() == []
    await provider.close()
    assert not _pwned(tmp_path)


async def test_the_gateway_starts_ssh_hosts_from_its_command_line(
    tmp_path: Path, sshd: Sshd
) -> None:
    """`nbcluster gateway --hosts-from ssh --ssh-hosts ...`: the auto-scaler keeps its
    minimum of hosts running on the ``--ssh-hosts`` machine, and they register. A kernelspec
    naming that machine and two others in ``remote_hosts`` gets daemons started on the
    other two for its kernel (general scale-outs never use them)."""
    port = sshd.ports[0]
    machines = [f"{sshd.user}@{a}:{port}" for a in ADDRESSES]
    specs = tmp_path / "kernelspecs"
    (specs / "pinned").mkdir(parents=True)
    (specs / "pinned" / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
                "display_name": "Python 3 (two machines)",
                "language": "python",
                "metadata": {"kernel_provisioner": {"config": {"remote_hosts": machines}}},
            }
        )
    )
    cluster = Cluster(
        tmp_path / "state",
        hosts=0,
        replicas=3,
        gateway_args=[
            *("--hosts-from", "ssh", "--ssh-hosts", machines[0], "--ssh-key", str(sshd.user_key)),
            *("--ssh-known-hosts", str(sshd.write_known_hosts(tmp_path / "known_hosts"))),
            *("--ssh-nbcluster", NBCLUSTER, "--ssh-state-dir", str(tmp_path / "state")),
            *("--min-hosts", "1", "--max-hosts", "3", "--scaling-interval", "0.5"),
            *("--kernelspec-dir", str(specs), "--stop-hosts-on-exit"),
        ],
    )
    try:
        cluster.start_gateway()
        await async_wait_for(
            lambda: cluster.connected_hosts() == ["ssh-127.0.0.1"],
            45,
            "the gateway's ssh host to register",
        )
        async with GatewayClient(cluster.url, cluster.token, timeout=120) as gw:
            kid = (await gw.start_kernel("pinned"))["id"]
            pinned = ["ssh-127.0.0.1", "ssh-127.0.0.2", "ssh-127.0.0.3"]
            assert sorted(r["host"] for r in cluster.replicas(kid)) == pinned
            assert cluster.kernel_summary(kid)["hosts"] == pinned
            assert sorted(cluster.connected_hosts()) == pinned
            async with gw.channels(kid) as channels:
                result = await channels.execute("import socket; print(6 * 7)", 60)
                assert result.status == "ok", result.reply
                assert result.stream_text() == "42\n"
            await gw.shutdown_kernel(kid)
    except BaseException:
        print(cluster.logs(), "\n===== sshd\n", sshd.log())
        raise
    finally:
        cluster.stop()
    wait_for(lambda: not processes_mentioning(tmp_path / "state"), 15, "the hosts to stop")
