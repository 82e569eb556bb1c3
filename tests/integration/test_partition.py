"""A replicated kernel under a real network partition: one host is cut off from the gateway and
from the other hosts with Linux network namespaces (its processes keep running), then the
partition heals.

Topology, built per test and removed afterwards (root is required; the tests skip otherwise):

* a Linux bridge ``nbb<pid>t<n>`` in the root namespace with ``10.213.<k>.1/24``, ``k`` a
  random free subnet; the gateway listens there;
* four namespaces ``nbc<pid>t<n>h<i>``, each holding one host daemon (and so its replicas'
  ZMQ and Raft ports) on ``10.213.<k>.<10+i>``, its ``eth0`` being one end of a veth pair whose
  other end ``nbv<pid>t<n>h<i>`` is a port of the bridge. Hosts reach each other and the
  gateway only through the bridge; there is no default route out of a namespace.

Before a test relies on it, :meth:`Network.check_passage` checks that packets do pass: from a
namespace to another across the bridge, and to the gateway's address. A Docker engine started
with its iptables rules sets the FORWARD policy to DROP, and with ``br_netfilter`` loaded that
drops bridged packets too; the check fails naming that cause (start ``dockerd
--iptables=false``, as ``deploy/docker/engine-up.sh`` does) instead of the cluster failing to
form for no visible reason.

Cutting a host takes its bridge port down: packets to and from it are dropped silently, as
with a pulled cable, and every TCP connection it has (its websocket to the gateway, the
gateway's ZMQ links to its replicas, Raft between replicas) stays open on both ends without
delivering anything. Healing brings the port back up.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbcluster.client import GatewayClient, KernelChannels

from ..cluster import Cluster, async_wait_for, process_gone, processes_mentioning, wait_for

pytestmark = pytest.mark.integration

HOSTS = 4
HOST_LOST_TIMEOUT = 3.0
#: A cell on a healthy kernel, or any single step the cluster takes on its own, takes less.
QUICK = 15.0
#: After a heal: TCP retransmission back-off plus the host's reconnect back-off (at most 5 s).
RECONNECT = 25.0
#: How long after a heal cells keep running while the stale replica is back on the network.
STALE_WINDOW = 4.0

_tests = itertools.count(1)


# -- the network ------------------------------------------------------------------------------


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)


def _ip_ok(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


#: Connects to ADDRESS:PORT within TIMEOUT seconds: an answer, even a refusal (a reset), shows
#: that packets pass both ways; a timeout or an ICMP error shows they do not.
_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except ConnectionRefusedError:
    pass
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""
#: A port nothing listens on in a new namespace (the discard service).
_PROBE_PORT = 9


def _bridge_filtering() -> str:
    """What can drop packets on a Linux bridge here: br_netfilter and the FORWARD chain."""
    facts = []
    nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if nf.exists():
        value = nf.read_text().strip()
        facts.append(
            f"net.bridge.bridge-nf-call-iptables={value}"
            + (
                " (br_netfilter: bridged packets go through iptables' FORWARD chain)"
                if value == "1"
                else ""
            )
        )
    else:
        facts.append("br_netfilter is not loaded")
    iptables = shutil.which("iptables")
    if iptables is None:
        facts.append("no iptables command to read the FORWARD chain with")
    else:
        rules = subprocess.run(
            [iptables, "-S", "FORWARD"], capture_output=True, text=True, timeout=10, check=False
        )
        chain = (rules.stdout or rules.stderr).strip()
        facts.append(f"`iptables -S FORWARD`: {chain!r}")
        if "-P FORWARD DROP" in chain:
            facts.append(
                "the FORWARD policy is DROP: dockerd sets it unless it runs with "
                "--iptables=false (deploy/docker/engine-up.sh starts it so)"
            )
    return "; ".join(facts)


class Network:
    """A bridge in the root namespace and one namespace per host, attached to it by veths.

    :meth:`create` builds it, :meth:`destroy` removes everything it built (also after a
    partial :meth:`create`); :meth:`cut` and :meth:`heal` partition a host.
    """

    def __init__(self, hosts: int) -> None:
        tag = f"{os.getpid()}t{next(_tests) % 10}"
        self.bridge = f"nbb{tag}"
        self.namespaces = [f"nbc{tag}h{i}" for i in range(1, hosts + 1)]
        self.ports = [f"nbv{tag}h{i}" for i in range(1, hosts + 1)]  # bridge side of each veth
        self.subnet = ""
        self._made_bridge = False
        self._made: list[str] = []  # namespaces created
        self._cut: set[int] = set()

    @property
    def gateway_ip(self) -> str:
        return f"{self.subnet}.1"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    @staticmethod
    def _free_subnet() -> str:
        used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
        for _ in range(50):
            subnet = f"10.213.{random.randint(100, 250)}"
            if f"{subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.213.x.0/24 subnet among 100..250")

    def create(self) -> None:
        # The first namespace first: without the privilege for it, skip rather than fail.
        first = _ip("netns", "add", self.namespaces[0])
        if first.returncode != 0:
            if any(s in first.stderr for s in ("Permission denied", "Operation not permitted")):
                pytest.skip(f"network namespaces need root (ip netns add: {first.stderr.strip()})")
            raise RuntimeError(f"ip netns add {self.namespaces[0]}: {first.stderr.strip()}")
        self._made.append(self.namespaces[0])
        self.subnet = self._free_subnet()
        _ip_ok("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip_ok("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip_ok("link", "set", self.bridge, "up")
        for i, (ns, port) in enumerate(zip(self.namespaces, self.ports, strict=True)):
            if ns not in self._made:
                _ip_ok("netns", "add", ns)
                self._made.append(ns)
            _ip_ok("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip_ok("link", "set", port, "master", self.bridge)
            _ip_ok("link", "set", port, "up")
            _ip_ok("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip_ok("-n", ns, "link", "set", "eth0", "up")
            _ip_ok("-n", ns, "link", "set", "lo", "up")

    def check_passage(self, timeout: float = 3.0) -> None:
        """Fail, naming the likely cause, unless packets pass from the first namespace to the
        second across the bridge (forwarded by the bridge) and to the gateway's address."""
        paths = [
            (self.address(1), f"{self.namespaces[1]} across the bridge {self.bridge}"),
            (self.gateway_ip, f"the gateway's address {self.gateway_ip} on {self.bridge}"),
        ]
        for address, what in paths:
            done = subprocess.run(
                [
                    *self.exec_prefix(0),
                    sys.executable,
                    "-I",
                    "-c",
                    _PROBE,
                    address,
                    str(_PROBE_PORT),
                    str(timeout),
                ],
                capture_output=True,
                text=True,
                timeout=timeout + 15,
                check=False,
            )
            if done.returncode != 0:
                raise AssertionError(
                    f"packets do not pass from {self.namespaces[0]} to {what} "
                    f"({done.stderr.strip() or done.returncode}): the partition tests cannot "
                    f"run on this machine's network filtering. {_bridge_filtering()}. "
                    "Fix: run dockerd with --iptables=false, or allow the test bridges "
                    "(`iptables -I FORWARD -i 'nbb+' -o 'nbb+' -j ACCEPT`), or "
                    "`sysctl net.bridge.bridge-nf-call-iptables=0`."
                )

    def cut(self, i: int) -> None:
        """Partition host ``i`` from everything: its bridge port goes down."""
        _ip_ok("link", "set", self.ports[i], "down")
        self._cut.add(i)

    def heal(self, i: int) -> None:
        _ip_ok("link", "set", self.ports[i], "up")
        self._cut.discard(i)

    def heal_all(self) -> None:
        for i in list(self._cut):
            with contextlib.suppress(RuntimeError):
                self.heal(i)

    def destroy(self) -> None:
        """Remove what :meth:`create` made; raise if something could not be removed."""
        errors = []
        for ns in self._made:
            done = _ip("netns", "del", ns)  # takes the veth pair with it
            if done.returncode != 0:
                errors.append(f"ip netns del {ns}: {done.stderr.strip()}")
        for port in self.ports:  # only left if its namespace was not deleted
            if _ip("link", "show", port).returncode == 0:
                _ip("link", "del", port)
        if self._made_bridge:
            done = _ip("link", "del", self.bridge)
            if done.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {done.stderr.strip()}")
        leftovers = [ns for ns in self._made if ns in _ip("netns", "list").stdout]
        if leftovers:
            errors.append(f"namespaces left behind: {leftovers}")
        if errors:
            raise AssertionError("; ".join(errors))


# -- the cluster ------------------------------------------------------------------------------


def _host_name(i: int) -> str:
    return f"host-{i + 1}"


def _host_index(name: str) -> int:
    return int(name.removeprefix("host-")) - 1


_RECORD = re.compile(r"^(\[[^\]]*\])?\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")


def _without_frames(text: str) -> str:
    """A log without the websockets library's debug records (one per heartbeat frame)."""
    kept, skipping = [], False
    for line in text.splitlines():
        if _RECORD.match(line):
            skipping = "websockets." in line
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def _all_logs(state_dir: Path) -> str:
    """The ends of the gateway's, the hosts' and every replica's log."""
    paths = sorted((state_dir / "logs").glob("*.log")) + sorted(
        (state_dir / "hosts").glob("*/logs/*.log")
    )
    return "\n".join(
        f"===== {p.relative_to(state_dir)}\n{_without_frames(p.read_text(errors='replace'))[-5000:]}"
        for p in paths
    )


@pytest.fixture
def net() -> Iterator[Network]:
    network = Network(HOSTS)
    try:
        network.create()
        network.check_passage()
        yield network
    finally:
        network.destroy()


@pytest.fixture
def cluster(tmp_path: Path, net: Network) -> Iterator[Cluster]:
    """A gateway on the bridge and one host daemon in each namespace, 3 replicas per kernel.

    Torn down before :func:`net`: partitions healed (so that everything can shut down
    cleanly), every process stopped, and the test fails if any process of the cluster is
    left (the daemons run under ``ip netns exec``, which execs them: their pids are ours).
    """
    state_dir = tmp_path / "state"
    c = Cluster(
        state_dir, hosts=0, replicas=3, ip=net.gateway_ip, host_lost_timeout=HOST_LOST_TIMEOUT
    )
    try:
        try:
            c.start_gateway()
            for i in range(HOSTS):
                c.start_host(_host_name(i), address=net.address(i), prefix=net.exec_prefix(i))
            wait_for(lambda: len(c.connected_hosts()) == HOSTS, 30, "the hosts to connect")
        except BaseException:
            print(_all_logs(state_dir))
            raise
        yield c
        print(_all_logs(state_dir))  # shown when the test failed
    finally:
        net.heal_all()
        c.stop()
        leftovers = processes_mentioning(state_dir)
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=5)
    if leftovers:
        raise AssertionError(f"processes left behind: {[p.info['cmdline'] for p in leftovers]}")


# -- helpers ----------------------------------------------------------------------------------


def _host_state(cluster: Cluster, name: str) -> str:
    (host,) = [h for h in cluster.http.get("/api/cluster/hosts").json() if h["name"] == name]
    return str(host["state"])


def _replica(cluster: Cluster, kid: str, replica_id: str) -> dict[str, Any]:
    (replica,) = [r for r in cluster.replicas(kid) if r["replica_id"] == replica_id]
    return replica


def _running(cluster: Cluster, kid: str) -> list[dict[str, Any]]:
    return [r for r in cluster.replicas(kid) if r["state"] == "running"]


def _executor(cluster: Cluster, kid: str) -> dict[str, Any]:
    return _replica(cluster, kid, str(cluster.kernel_summary(kid)["executor"]))


async def _cell(channels: KernelChannels, code: str, timeout: float = QUICK) -> str:
    """Run a cell that must succeed on exactly one replica; return its ``text/plain``."""
    result = await channels.execute(code, timeout=timeout)
    assert result.status == "ok", result.reply
    assert len(result.of_type("execute_input")) == 1, result.outputs
    (out,) = result.of_type("execute_result")
    return str(out["content"]["data"]["text/plain"])


SETUP = "x = 1\nhistory = [1]\ndef tenfold():\n    return x * 10\n"


def _step(value: int) -> str:
    """A cell that moves the state on: it only gives ``(value, ...)`` on the latest state."""
    return f"history.append({value})\nx = {value}\n(x, tenfold(), history[-3:])"


def _expect(value: int, history: list[int]) -> str:
    return repr((value, value * 10, history[-3:]))


async def _steps(channels: KernelChannels, history: list[int], values: range) -> None:
    for value in values:
        started = time.monotonic()
        history.append(value)
        assert await _cell(channels, _step(value)) == _expect(value, history)
        assert time.monotonic() - started < QUICK


async def _check_one_executor(cluster: Cluster, kid: str) -> None:
    summary = cluster.kernel_summary(kid)
    running = _running(cluster, kid)
    assert len(running) == 3, cluster.replicas(kid)
    assert len({r["host"] for r in running}) == 3
    assert summary["executor"] in {r["replica_id"] for r in running}, summary


def _reachable(address: str, port: int) -> bool:
    """Whether a TCP connection from the root namespace to ``address:port`` is accepted."""
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _heal_and_check(
    cluster: Cluster,
    net: Network,
    kid: str,
    channels: KernelChannels,
    cut: dict[str, Any],
    history: list[int],
) -> None:
    """Heal ``cut``'s host. The kernel must go on serving the latest state from one executor
    while the stale replica is reachable again; then the host must be taken back, and the
    stale replica (replaced meanwhile) stopped."""
    (record,) = [
        r for r in cluster.state_record(kid)["replicas"] if r["replica_id"] == cut["replica_id"]
    ]
    net.heal(_host_index(cut["host"]))
    healed = time.monotonic()
    # The gateway may take the host back and stop the stale replica before a poll here sees
    # its port: either way the host is reachable again.
    await async_wait_for(
        lambda: (
            _reachable(record["connection"]["ip"], record["connection"]["hb_port"])
            or process_gone(cut["pid"])
        ),
        QUICK,
        f"{cut['host']} to be reachable again (or its stale replica stopped)",
    )
    # The stale replica is back on the network (and its Raft node with it): for a while,
    # cells must still run at once, on one replica, with the latest state.
    value, before = history[-1], len(history)
    while time.monotonic() - healed < STALE_WINDOW:
        value += 1
        await _steps(channels, history, range(value, value + 1))
    assert await _cell(channels, f"history == {history!r}") == "True"
    await _check_one_executor(cluster, kid)
    print(f"{len(history) - before} cells ran correctly in the {STALE_WINDOW:g} s after the heal")

    # Liveness: the host is taken back and the stale replica, which no kernel uses any more,
    # is stopped (docs/architecture.md, "Hosts, liveness and failure").
    def host_back() -> bool:
        return _host_state(cluster, cut["host"]) == "connected"

    try:
        await async_wait_for(host_back, RECONNECT, f"{cut['host']} to be connected again")
    except AssertionError as exc:
        hosts = cluster.http.get("/api/cluster/hosts").json()
        (host,) = [h for h in hosts if h["name"] == cut["host"]]
        raise AssertionError(
            f"{exc}. {RECONNECT:g} s after the heal the gateway still has {host}; the "
            f"stale replica (pid {cut['pid']}) is "
            f"{'gone' if process_gone(cut['pid']) else 'still running'}"
        ) from None
    print(f"{cut['host']} connected again {time.monotonic() - healed:.2f} s after the heal")
    await async_wait_for(
        lambda: process_gone(cut["pid"]), QUICK, f"the stale replica {cut['pid']} to be stopped"
    )
    assert _replica(cluster, kid, cut["replica_id"])["state"] == "dead"
    value = history[-1]
    await _steps(channels, history, range(value + 1, value + 3))
    await _check_one_executor(cluster, kid)


# -- the tests --------------------------------------------------------------------------------


async def test_a_cut_off_standby_is_replaced_and_rejoins_harmlessly(
    cluster: Cluster, net: Network
) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kid = (await gw.start_kernel())["id"]
        original = cluster.replicas(kid)
        assert len({r["host"] for r in original}) == 3
        (spare,) = {_host_name(i) for i in range(HOSTS)} - {r["host"] for r in original}
        async with gw.channels(kid) as channels:
            history = [1]
            assert await _cell(channels, SETUP + "tenfold()") == "10"
            await _steps(channels, history, range(2, 4))
            executor = _executor(cluster, kid)
            cut = next(r for r in original if r["replica_id"] != executor["replica_id"])

            net.cut(_host_index(cut["host"]))
            cut_at = time.monotonic()
            # The two others are a Raft majority: cells go on at once, on the same executor.
            await _steps(channels, history, range(4, 8))
            assert _executor(cluster, kid)["replica_id"] == executor["replica_id"]
            print(f"4 cells ran in {time.monotonic() - cut_at:.2f} s with a standby cut off")

            # The host falls silent: the gateway declares it lost, its replica dead ...
            await async_wait_for(
                lambda: _host_state(cluster, cut["host"]) == "lost",
                HOST_LOST_TIMEOUT + QUICK,
                f"{cut['host']} to be declared lost",
            )
            assert not process_gone(cut["pid"])  # cut off, not killed
            replica = _replica(cluster, kid, cut["replica_id"])
            assert replica["state"] == "dead"
            assert f"host {cut['host']} was lost" in replica["reason"]
            # ... and replaces it on the only host without one.
            await async_wait_for(
                lambda: (
                    len(_running(cluster, kid)) == 3
                    and cut["replica_id"] not in {r["replica_id"] for r in _running(cluster, kid)}
                ),
                QUICK,
                "a replacement replica to join",
            )
            (new,) = [
                r
                for r in _running(cluster, kid)
                if r["replica_id"] not in {o["replica_id"] for o in original}
            ]
            assert new["host"] == spare
            print(f"replaced {time.monotonic() - cut_at:.2f} s after the cut")
            await _steps(channels, history, range(8, 10))

            await _heal_and_check(cluster, net, kid, channels, cut, history)
        await gw.shutdown_kernel(kid)


async def test_a_cut_off_executor_fails_over_with_its_state(cluster: Cluster, net: Network) -> None:
    async with GatewayClient(cluster.url, cluster.token) as gw:
        kid = (await gw.start_kernel())["id"]
        async with gw.channels(kid) as channels:
            history = [1]
            assert await _cell(channels, SETUP + "tenfold()") == "10"
            await _steps(channels, history, range(2, 4))
            executor = _executor(cluster, kid)

            net.cut(_host_index(executor["host"]))
            cut_at = time.monotonic()
            # The next cell goes to the executor, which never gets it. The gateway cannot know
            # whether it ran; once the host is lost it answers the cell with ReplicaLost.
            history.append(4)
            result = await channels.execute(_step(4), timeout=HOST_LOST_TIMEOUT + QUICK)
            answered = time.monotonic() - cut_at
            if result.status == "error":
                assert result.reply["ename"] == "ReplicaLost", result.reply
                assert executor["host"] in result.reply["evalue"], result.reply
                # Run again, as the user would: on another replica, with all the state, and
                # without the lost attempt's effect (history gets 4 once).
                assert await _cell(channels, _step(4)) == _expect(4, history)
            else:
                (out,) = result.of_type("execute_result")
                assert out["content"]["data"]["text/plain"] == _expect(4, history)
            failover = time.monotonic() - cut_at
            print(
                f"executor cut off: the pending cell was answered ({result.status}) after "
                f"{answered:.2f} s; a cell ran on another replica {failover:.2f} s after the cut"
            )
            assert failover < HOST_LOST_TIMEOUT + QUICK
            new_executor = _executor(cluster, kid)
            assert new_executor["host"] != executor["host"]
            assert _replica(cluster, kid, executor["replica_id"])["state"] == "dead"
            assert not process_gone(executor["pid"])  # cut off, not killed
            assert await _cell(channels, f"history == {history!r}") == "True"

            await async_wait_for(
                lambda: len(_running(cluster, kid)) == 3,
                QUICK,
                "a replacement replica to join",
            )
            await _steps(channels, history, range(5, 7))
            await _heal_and_check(cluster, net, kid, channels, executor, history)
        await gw.shutdown_kernel(kid)
