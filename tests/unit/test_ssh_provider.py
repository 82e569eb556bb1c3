"""The ssh host provider's pure parts: machine specs, host names, the checks on every value
that reaches a remote command line, the command itself (quoting round-trips through a POSIX
shell's word splitting), and the host-key decisions. The provider against a real sshd is
``tests/integration/test_ssh_hosts.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import shlex
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcluster.gateway import HostProvider, HostProviderError, MachineHostProvider
from nbcluster.gateway._ssh_command import (
    ARG0,
    MARKER,
    SCRIPT,
    Machine,
    RemoteHost,
    host_names,
    merge_machines,
    parse_machine,
    parse_machines,
    remote_command,
    validate_join_token,
    validate_remote_path,
)
from nbcluster.gateway._ssh_provider import SshHostProvider

TOKEN = "nbj_s3cret-join-token"
URL = "http://10.0.0.1:8889"

# -- machines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "machine", "text"),
    [
        ("gpu1", Machine("gpu1"), "gpu1"),
        ("ubuntu@gpu2.example.org:2222", Machine("gpu2.example.org", 2222, "ubuntu"), None),
        ("gpu3/10.1.0.3", Machine("gpu3", address="10.1.0.3"), None),
        ("10.0.0.4:22", Machine("10.0.0.4"), "10.0.0.4"),
        ("[fd00::4]:2200", Machine("fd00::4", 2200), None),
        ("root@[::1]", Machine("::1", user="root"), "root@[::1]"),
        ("node_5.", Machine("node_5."), None),
        (" gpu6 ", Machine("gpu6"), "gpu6"),
        ("a@h:1/fd00::9", Machine("h", 1, "a", "fd00::9"), None),
    ],
)
def test_machine_specs(spec: str, machine: Machine, text: str | None) -> None:
    assert parse_machine(spec) == machine
    assert str(machine) == (text or spec)
    assert parse_machine(str(machine)) == machine


INJECTIONS = [
    "127.0.0.1;touch /tmp/PWN",
    "$(touch /tmp/PWN)",
    "`touch /tmp/PWN`",
    "-oProxyCommand=touch /tmp/PWN",
    "-oProxyCommand=touch",
    "host name",
    "host\nname",
    "host|touch",
    "host&",
    "host>x",
    "host'",
    'host"',
    "host\\x",
    "host*",
    "root;touch x@host",
    "$(id)@host",
    "-l@host",
    "u@host:22;touch",
    "u@host:22 -oProxyCommand=x",
    "host/1.2.3.4;touch",
    "host/$(touch)",
    "host/-x",
    "[::1];touch:22",
    "[::1]x",
]


@pytest.mark.parametrize("spec", INJECTIONS)
def test_machine_specs_with_shell_or_ssh_syntax_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="ssh machine") as refused:
        parse_machine(spec)
    assert repr(spec.strip()) in str(refused.value) or "control character" in str(refused.value)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty"),
        ("host:", "the port is missing"),
        ("host:0", "is not a port"),
        ("host:65536", "is not a port"),
        ("host:\uff12\uff12", "is not a port"),  # fullwidth digits
        ("host:ssh", "is not a port"),
        ("::1", "write an IPv6 address as"),
        ("[::1", "write an IPv6 address as"),
        ("[gpu1]:22", "is not an IPv6 address"),
        ("1user@host", "is not a user name"),
        ("host/", "is not an IP address or a host name"),
    ],
)
def test_malformed_machine_specs_say_what_is_wrong(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_machine(spec)


def test_machine_lists() -> None:
    assert parse_machines("a, b:2,,c") == [Machine("a"), Machine("b", 2), Machine("c")]
    assert parse_machines(["a,b", "c"]) == [Machine("a"), Machine("b"), Machine("c")]
    with pytest.raises(ValueError, match="no ssh machines"):
        parse_machines(" , ")
    # One daemon per machine: the same host and port twice is refused, whoever logs in.
    with pytest.raises(ValueError, match=r"me@GPU1\. is listed twice \(also as gpu1\)"):
        parse_machines("gpu1,me@GPU1.:22")
    assert len(parse_machines("gpu1,gpu1:2222")) == 2


def test_host_names() -> None:
    machines = parse_machines("gpu1,gpu2.example.org,10.0.0.3,[fd00::4]")
    assert host_names(machines, "ssh") == [
        "ssh-gpu1",
        "ssh-gpu2.example.org",
        "ssh-10.0.0.3",
        "ssh-fd00--4",
    ]
    assert host_names(machines[:1], "") == ["gpu1"]
    # Machines sharing a host are told apart by their ports.
    assert host_names(parse_machines("h:2201,H:2202,g"), "p") == ["p-h-2201", "p-h-2202", "p-g"]
    for prefix in ("ssh;touch", "-x", "a b", "$(id)", "x" * 65):
        with pytest.raises(ValueError, match="host name prefix"):
            host_names(machines, prefix)


# -- values on the remote command line ---------------------------------------------------------


def test_remote_paths() -> None:
    assert validate_remote_path("~/.venv/bin/nbcluster", "p") == ".venv/bin/nbcluster"
    assert validate_remote_path("~", "p") == "."
    assert validate_remote_path("/opt/a b/$(x)", "p") == "/opt/a b/$(x)"  # quoted, not refused
    with pytest.raises(ValueError, match="another user's home"):
        validate_remote_path("~root/nbcluster", "the nbcluster program")
    with pytest.raises(ValueError, match="starts with '-'"):
        validate_remote_path("--help", "the state directory")
    for bad in ("a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7fb"):
        with pytest.raises(ValueError, match="control character"):
            validate_remote_path(bad, "the CA file")
    with pytest.raises(ValueError, match="is empty"):
        validate_remote_path("", "the CA file")


def _host(**fields: object) -> RemoteHost:
    values: dict[str, object] = {
        "nbcluster": "nbcluster",
        "gateway_url": URL,
        "name": "ssh-gpu1",
        "address": "10.0.0.7",
        **fields,
    }
    return RemoteHost(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": "ssh;touch x"}, "host name"),
        ({"name": "-x"}, "host name"),
        ({"address": "$(touch x)"}, "is not an IP address or a host name"),
        ({"address": "10.0.0.1 -x"}, "is not an IP address or a host name"),
        ({"log_level": "info;touch x"}, "log level"),
        ({"gpus": -1}, "gpus must be"),
        ({"gateway_url": "ftp://h/"}, "is not an http"),
        ({"gateway_url": "http://h/a b"}, "contains a space"),
        ({"gateway_url": "http://h/\n"}, "control character"),
        ({"nbcluster": "nbcluster\ntouch x"}, "control character"),
        ({"nbcluster": "-c"}, "starts with '-'"),
        ({"state_dir": "/s\n"}, "control character"),
        ({"extra_args": ("--work-dir", "a\nb")}, "control character"),
        ({"extra_args": ("--gateway=http://evil/",)}, "sets --gateway itself"),
        ({"extra_args": ("--join-token-file", "/x")}, "sets --join-token-file itself"),
    ],
)
def test_remote_values_that_are_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _host(**fields)


def test_the_command_line() -> None:
    host = _host(gpus=2, ca="/etc/ca.pem", state_dir="~/state", extra_args=("--cpus", "4"))
    assert host.argv() == [
        "nbcluster", "host", "--gateway", URL, "--name", "ssh-gpu1", "--address", "10.0.0.7",
        "--log-level", "warning", "--gpus", "2", "--ca", "/etc/ca.pem", "--state-dir", "state",
        "--cpus", "4",
    ]  # fmt: skip
    command = remote_command(host, 10)
    assert shlex.split(command) == ["exec", "/bin/sh", "-c", SCRIPT, ARG0, "10", *host.argv()]
    assert TOKEN not in command
    with pytest.raises(ValueError, match="grace period"):
        remote_command(host, 0)
    # The script is fixed text: its only inputs are positional parameters.
    assert "{" not in SCRIPT.replace("{ echo", "") and "\n" not in SCRIPT
    assert MARKER.match("nbcluster-ssh: pid 4242") and not MARKER.match("nbcluster-ssh: pid x")


PRINTABLE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\x7f"), min_size=1
).filter(lambda s: not any(ord(c) < 32 for c in s) and not s.startswith(("-", "~")))


@settings(max_examples=200, deadline=None)
@given(nbcluster=PRINTABLE, state_dir=PRINTABLE, ca=PRINTABLE, path=PRINTABLE, arg=PRINTABLE)
def test_any_printable_value_is_one_literal_word(
    nbcluster: str, state_dir: str, ca: str, path: str, arg: str
) -> None:
    url = f"{URL}/{path.replace(' ', '%20')}"
    host = _host(
        nbcluster=nbcluster, state_dir=state_dir, ca=ca, gateway_url=url, extra_args=("-x", arg)
    )
    words = shlex.split(remote_command(host, 3))
    assert words[6:] == host.argv()
    assert words[6] == nbcluster and state_dir in words and ca in words and arg in words


def test_nothing_of_a_kernel_request_reaches_the_remote_command() -> None:
    """docs/ssh-hosts.md, "KERNEL_* values": the command is made of the provider's own
    configuration only. A field added here must be checked and quoted like the others, and
    must not carry a request's value: this test makes the addition a conscious one."""
    assert [f.name for f in dataclasses.fields(RemoteHost)] == [
        "nbcluster", "gateway_url", "name", "address", "log_level", "gpus", "ca", "state_dir",
        "extra_args",
    ]  # fmt: skip
    assert list(inspect.signature(SshHostProvider.start_hosts).parameters) == ["self", "count"]


def test_join_tokens() -> None:
    assert validate_join_token(" a'b$(c) ") == " a'b$(c) "
    for bad in ("", "a\nb", "a\rb", "a\x00b"):
        with pytest.raises(ValueError) as refused:
            validate_join_token(bad)
        assert bad == "" or bad not in str(refused.value)  # never echoed


# -- the provider ------------------------------------------------------------------------------


def _provider(tmp_path: Path, **options: object) -> SshHostProvider:
    values: dict[str, object] = {"known_hosts": tmp_path / "known_hosts", **options}
    return SshHostProvider("gpu1,gpu2:2222/10.0.0.2", URL, TOKEN, **values)  # type: ignore[arg-type]


def test_the_provider_checks_its_options(tmp_path: Path) -> None:
    provider = _provider(tmp_path)
    assert isinstance(provider, HostProvider) and provider.name == "ssh"
    assert list(provider.machines()) == ["ssh-gpu1", "ssh-gpu2"]
    assert TOKEN not in repr(provider)
    command = provider.command("ssh-gpu1", "10.0.0.1")
    assert TOKEN not in command
    assert shlex.split(command)[-8:] == [
        "--gateway", URL, "--name", "ssh-gpu1", "--address", "10.0.0.1", "--log-level", "warning",
    ]  # fmt: skip
    # A machine's own address wins over the one its connection reached.
    assert provider.remote_host("ssh-gpu2", "192.168.0.9").address == "10.0.0.2"
    assert provider.started() == [] and not provider.owns("ssh-gpu1")
    with pytest.raises(HostProviderError, match="not one of the ssh host provider's machines"):
        provider.command("gpu3", "10.0.0.3")
    for options, reason in [
        ({"user": "root;touch"}, "is not a user name"),
        ({"client_keys": [tmp_path / "missing"]}, "no such file"),
        ({"ssh_config": tmp_path / "missing"}, "no such file"),
        ({"stop_grace": 0}, "stop_grace must be"),
        ({"connect_timeout": float("nan")}, "connect_timeout must be"),
        ({"max_restarts": -1}, "max_restarts must be"),
        ({"nbcluster": "a\nb"}, "control character"),
        ({"name_prefix": "a;b"}, "host name prefix"),
        ({"log_level": "loud"}, "log level"),
        ({"host_args": ["--name", "x"]}, "sets --name itself"),
    ]:
        with pytest.raises(ValueError, match=reason):
            _provider(tmp_path, **options)
    with pytest.raises(ValueError, match="join token contains") as refused:
        SshHostProvider("gpu1", URL, "nbj_x\ntouch y")
    assert "touch y" not in str(refused.value)


async def test_a_provider_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    provider = _provider(tmp_path)
    with pytest.raises(HostProviderError, match="cannot start -1 hosts"):
        await provider.start_hosts(-1)
    assert await provider.start_hosts(0) == []
    with pytest.raises(HostProviderError, match="was not started by the ssh host provider"):
        await provider.stop_host("ssh-gpu1")
    with pytest.raises(HostProviderError, match="not one of"):
        await provider.stop_host("auto-1")
    await provider.close()
    with pytest.raises(HostProviderError, match="closed"):
        await provider.start_hosts(1)


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


def test_host_key_decisions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key, other = _key(), _key()
    listed = asyncssh.import_known_hosts(
        "[gpu2]:2222 " + other.export_public_key().decode().strip() + "\n"
    )
    empty = asyncssh.import_known_hosts("")
    gpu1, gpu2 = parse_machines("gpu1,gpu2:2222")

    strict = _provider(tmp_path)
    refusal = strict._judge_host_key(gpu1, "gpu1", "10.0.0.1", 22, key, empty)
    assert refusal is not None
    assert key.get_fingerprint() in refusal and str(tmp_path / "known_hosts") in refusal
    assert "--ssh-accept-unknown-hosts" in refusal

    caplog.set_level(logging.WARNING)
    trusting = _provider(tmp_path, accept_unknown_hosts=True)
    assert any("UNKNOWN HOST KEYS WILL BE ACCEPTED" in r.getMessage() for r in caplog.records)
    # Unknown: let in, loudly, and pinned.
    assert trusting._judge_host_key(gpu1, "gpu1", "10.0.0.1", 22, key, empty) is None
    assert any(
        "ACCEPTING ITS UNKNOWN HOST KEY " + key.get_fingerprint() in r.getMessage()
        for r in caplog.records
    )
    assert trusting._judge_host_key(gpu1, "gpu1", "10.0.0.1", 22, key, empty) is None
    # Another key for a pinned machine, or one known_hosts contradicts: never.
    changed = trusting._judge_host_key(gpu1, "gpu1", "10.0.0.1", 22, other, empty)
    assert changed is not None and "is not the one it showed before" in changed
    mismatch = trusting._judge_host_key(gpu2, "gpu2", "10.0.0.2", 2222, key, listed)
    assert mismatch is not None and "is NOT the one" in mismatch


# -- kernelspecs' remote_hosts --------------------------------------------------------------


def test_kernelspec_machines_join_the_provider_but_not_general_scale_outs(tmp_path: Path) -> None:
    provider = _provider(tmp_path, kernelspec_machines=["gpu2:2222/10.0.0.2", "gpu3", "gpu4"])
    # gpu2 is in both lists (written the same way): one machine, one daemon.
    assert list(provider.machines()) == ["ssh-gpu1", "ssh-gpu2", "ssh-gpu3", "ssh-gpu4"]
    assert provider.hosts_of(["gpu3", "gpu2:2222"]) == {"ssh-gpu3", "ssh-gpu2"}
    with pytest.raises(HostProviderError, match="ssh machine gpu9 is not one of"):
        provider.hosts_of(["gpu9"])
    with pytest.raises(HostProviderError, match="is not a host name"):
        provider.hosts_of(["gpu1;reboot"])
    assert isinstance(provider, MachineHostProvider)


def test_a_machine_written_two_ways_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is listed as gpu1 and as root@gpu1: write it the same"):
        _provider(tmp_path, kernelspec_machines=["root@gpu1"])
    assert merge_machines([parse_machine("a")], [parse_machine("b"), parse_machine("a")]) == [
        parse_machine("a"),
        parse_machine("b"),
    ]


def test_kernelspec_machines_alone_are_enough(tmp_path: Path) -> None:
    provider = SshHostProvider(
        (), URL, TOKEN, kernelspec_machines=["gpu7"], known_hosts=tmp_path / "known_hosts"
    )
    assert list(provider.machines()) == ["ssh-gpu7"]
    with pytest.raises(ValueError, match="no ssh machines given"):
        SshHostProvider((), URL, TOKEN)


async def test_general_scale_outs_leave_kernelspec_machines_alone(tmp_path: Path) -> None:
    """Every ``--ssh-hosts`` machine busy: a general scale-out fails, naming the remedy, even
    though a kernelspec's machine is free; that one starts only when asked for by name."""
    provider = _provider(tmp_path, kernelspec_machines=["gpu3"], connect_timeout=0.5)
    launched: list[str] = []

    def fake_start(slot: Any) -> asyncio.Future[int | None]:
        launched.append(slot.name)
        slot.task = asyncio.get_running_loop().create_future()  # busy until closed
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        done.set_result(123)
        return done

    provider._start = fake_start  # type: ignore[method-assign]
    assert await provider.start_hosts(5) == ["ssh-gpu1", "ssh-gpu2"]
    with pytest.raises(HostProviderError, match="every ssh machine already runs"):
        await provider.start_hosts(1)
    assert await provider.start_hosts_among(2, {"ssh-gpu3", "ssh-gpu1"}) == ["ssh-gpu3"]
    with pytest.raises(HostProviderError, match="every machine of its kernelspec already runs"):
        await provider.start_hosts_among(1, {"ssh-gpu3"})
    assert launched == ["ssh-gpu1", "ssh-gpu2", "ssh-gpu3"]
    for slot in provider._slots:
        if slot.task is not None:
            slot.task.cancel()
