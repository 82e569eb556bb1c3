"""What the ssh host provider (``_ssh_provider``) sends to a machine, and the checks on every
value that goes into it. Pure: no I/O, so that all of it is unit-tested.

**The machines.** ``[USER@]HOST[:PORT][/ADDRESS]``, several separated by commas:
``gpu1,ubuntu@gpu2:2222,gpu3/10.1.0.3,[fd00::4]:22``. ``HOST`` is a DNS name or an IP address
(IPv6 in brackets); ``ADDRESS`` is the ``--address`` of the host daemon there (where its
replicas listen; the gateway and the other replicas must reach it), by default the address
the provider's ssh connection reached. Each machine runs at most one host daemon, called
``<prefix>-<HOST>`` (``<prefix>-<HOST>-<PORT>`` when two machines share a ``HOST``).

**The command.** sshd runs a session's command with the user's login shell (``$SHELL -c
COMMAND``), so what the provider sends is a shell command line. It is built from words, each
quoted with :func:`shlex.quote`, and its only code is :data:`SCRIPT`, a fixed text with
nothing interpolated into it: every value reaches it as a positional parameter and is used as
``"$1"`` or ``"$@"``, never evaluated. The line is::

    exec /bin/sh -c SCRIPT nbcluster-ssh GRACE NBCLUSTER host --gateway URL --name NAME \\
        --address ADDRESS --log-level LEVEL [--gpus N] [--ca FILE] [--state-dir DIR] [ARGS...]

:data:`SCRIPT` reads the join token from its standard input (the ssh channel: the token is on
no command line, in no file and in no log), checks that ``NBCLUSTER`` can be run, starts a
*lifeline* (a subshell that waits for the end of the channel's input and then sends SIGTERM to
the daemon, and SIGKILL to the session's process group ``GRACE`` seconds later), prints
``nbcluster-ssh: pid PID`` and replaces itself with the host daemon, which gets the token in
``NBCLUSTER_JOIN_TOKEN``. sshd makes each session's command a process-group leader, so PID is
also the group of the daemon and what it starts. The provider stops a daemon by closing the
channel's input; a lost connection closes it too, so a gateway that dies takes its ssh hosts
with it, as it does its local ones.

The values are also checked, so that a mistake is named where it is made rather than run:
machines, user names, host names and addresses must match strict patterns (no shell
metacharacter can pass them); paths and the gateway URL may hold any printable character
(a path may have spaces), and are only ever quoted.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "ARG0",
    "LOG_LEVELS",
    "MARKER",
    "RESERVED_HOST_OPTIONS",
    "SCRIPT",
    "Machine",
    "RemoteHost",
    "host_names",
    "merge_machines",
    "parse_machine",
    "parse_machines",
    "remote_command",
    "validate_address",
    "validate_gateway_url",
    "validate_host_name",
    "validate_join_token",
    "validate_remote_path",
    "validate_user",
]

#: The script every session runs (module docstring). One line: a login shell of the csh
#: family cannot take a newline inside quotes. ``$1`` is the grace period, then the daemon's
#: command line.
SCRIPT = (
    "grace=$1; shift; "
    "IFS= read -r token || "
    '{ echo "nbcluster-ssh: no join token on standard input" >&2; exit 97; }; '
    'case $1 in */*) [ -f "$1" ] && [ -x "$1" ];; *) command -v "$1" >/dev/null 2>&1;; esac || '
    '{ echo "nbcluster-ssh: cannot run $1: no such executable (PATH=$PATH)" >&2; exit 127; }; '
    "exec 3<&0; "
    "( trap '' HUP INT TERM; cat <&3 >/dev/null 2>&1; kill -TERM $$ 2>/dev/null; "
    'sleep "$grace"; kill -KILL 0 2>/dev/null ) </dev/null >/dev/null 2>&1 & '
    'echo "nbcluster-ssh: pid $$"; '
    "NBCLUSTER_JOIN_TOKEN=$token; export NBCLUSTER_JOIN_TOKEN; "
    'exec "$@" 3<&- </dev/null'
)
#: ``$0`` of the script (what ``ps`` shows until the daemon replaces it).
ARG0 = "nbcluster-ssh"
#: The line the script prints on its standard output just before it runs the daemon.
MARKER = re.compile(r"^nbcluster-ssh: pid (\d+)$")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Options of ``nbcluster host`` the provider sets itself; extra arguments may not.
RESERVED_HOST_OPTIONS = (
    "--gateway",
    "--name",
    "--address",
    "--join-token-file",
    "--parent-pid",
    "--log-level",
    "--gpus",
    "--ca",
    "--state-dir",
)

_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,63}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_VALUE = 4096


def _control(value: str) -> str | None:
    found = _CONTROL.search(value)
    return None if found is None else repr(found.group())


def _host_or_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return len(value) <= 253 and _DNS_NAME.fullmatch(value) is not None
    return True


@dataclass(frozen=True)
class Machine:
    """One machine of ``--ssh-hosts``: where to ssh to, as whom, and the daemon's address."""

    host: str
    port: int = 22
    #: None: the provider's default user (else the gateway's own user name).
    user: str | None = None
    #: The host daemon's ``--address``; None: the address the ssh connection reached.
    address: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        """What makes two entries the same machine."""
        return self.host.lower().rstrip("."), self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.user}@{host}" if self.user else host
        text = text if self.port == 22 else f"{text}:{self.port}"
        return f"{text}/{self.address}" if self.address else text


def parse_machine(spec: str) -> Machine:
    """``[USER@]HOST[:PORT][/ADDRESS]`` (module docstring). Raises :class:`ValueError`
    naming what is wrong."""
    text = spec.strip()
    if not text:
        raise ValueError("an ssh machine is empty")
    if bad := _control(text):
        raise ValueError(f"ssh machine {spec!r}: contains the control character {bad}")
    rest, slash, address = text.partition("/")
    if slash:
        validate_address(address, f"ssh machine {spec!r}: the address")
    user: str | None = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        validate_user(user, f"ssh machine {spec!r}: ")
    port_text = ""
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"ssh machine {spec!r}: write an IPv6 address as [ADDRESS]:PORT")
        port_text = tail[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"ssh machine {spec!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = rest.partition(":")
        if colon and not port_text:
            raise ValueError(f"ssh machine {spec!r}: the port is missing after ':'")
        if ":" in port_text:
            raise ValueError(f"ssh machine {spec!r}: write an IPv6 address as [ADDRESS]:PORT")
        if not _host_or_ip(host):
            raise ValueError(f"ssh machine {spec!r}: {host!r} is not a host name or an IP address")
    port = 22
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"ssh machine {spec!r}: {port_text!r} is not a port (1-65535)")
        port = int(port_text)
    return Machine(host=host, port=port, user=user, address=address or None)


def parse_machines(specs: str | Iterable[str]) -> list[Machine]:
    """Machines from comma-separated text or a list of them (each may hold commas too).
    The same ``HOST:PORT`` twice is refused: each machine runs one host daemon."""
    parts = [specs] if isinstance(specs, str) else list(specs)
    machines = [parse_machine(p) for part in parts for p in part.split(",") if p.strip()]
    if not machines:
        raise ValueError("no ssh machines given")
    seen: dict[tuple[str, int], Machine] = {}
    for machine in machines:
        if machine.key in seen:
            raise ValueError(
                f"ssh machine {machine} is listed twice (also as {seen[machine.key]}): each "
                "machine runs one host daemon"
            )
        seen[machine.key] = machine
    return machines


def merge_machines(general: Sequence[Machine], more: Iterable[Machine]) -> list[Machine]:
    """``general`` (``--ssh-hosts``) then each machine of ``more`` (kernelspecs'
    ``remote_hosts``) not already there. The same ``HOST:PORT`` written differently (another
    user or address) is refused: it would be one daemon with two meanings."""
    merged = list(general)
    seen = {m.key: m for m in merged}
    for machine in more:
        known = seen.get(machine.key)
        if known is None:
            seen[machine.key] = machine
            merged.append(machine)
        elif known != machine:
            raise ValueError(
                f"ssh machine {machine.host}:{machine.port} is listed as {known} and as "
                f"{machine}: write it the same way in --ssh-hosts and every kernelspec's "
                "remote_hosts"
            )
    return merged


def host_names(machines: Sequence[Machine], prefix: str) -> list[str]:
    """The host daemon's name on each machine, in order: ``<prefix>-<HOST>``, with
    ``-<PORT>`` where two machines share a ``HOST`` (module docstring); ``prefix`` empty: the
    ``HOST`` alone."""
    if prefix and not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"host name prefix {prefix!r}: letters, digits, '.', '_', '-', starting with a "
            "letter or digit, at most 64"
        )

    def base(machine: Machine) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "-", machine.host.lower().rstrip("."))

    counts: dict[str, int] = {}
    for machine in machines:
        counts[base(machine)] = counts.get(base(machine), 0) + 1
    names = []
    for machine in machines:
        name = base(machine)
        if counts[name] > 1:
            name = f"{name}-{machine.port}"
        name = f"{prefix}-{name}" if prefix else name
        validate_host_name(name)
        names.append(name)
    return names


def validate_user(user: str, where: str = "") -> str:
    """A user name to log in as (an ssh protocol field, never on a command line)."""
    if not _USER.fullmatch(user):
        raise ValueError(
            f"{where}{user!r} is not a user name (letters, digits, '.', '_', '-'; not starting "
            "with a digit, '.' or '-')"
        )
    return user


def validate_host_name(name: str) -> str:
    """A host daemon's ``--name``: the host protocol's pattern, and not an option."""
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(
            f"host name {name!r}: 1-128 letters, digits, '.', '_', '-', starting with a letter "
            "or digit"
        )
    return name


def validate_address(address: str, what: str = "address") -> str:
    """A host daemon's ``--address``: an IP address or a DNS name."""
    if not _host_or_ip(address):
        raise ValueError(f"{what} {address!r} is not an IP address or a host name")
    return address


def validate_gateway_url(url: str) -> str:
    """The gateway URL hosts are given: http(s), with a host, and nothing a shell could split
    (no space or control character); it is quoted besides."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the gateway URL {url!r} is not an http(s) URL with a host")
    if bad := _control(url):
        raise ValueError(f"the gateway URL {url!r} contains the control character {bad}")
    if " " in url or len(url) > _MAX_VALUE:
        raise ValueError(f"the gateway URL {url!r} contains a space or is too long")
    return url


def validate_join_token(token: str) -> str:
    """The join token is sent as one line: no line break or other control character."""
    if not token:
        raise ValueError("the join token is empty")
    if _control(token) or len(token) > _MAX_VALUE:
        raise ValueError("the join token contains a control character or is too long")
    return token


def validate_remote_path(path: str, what: str) -> str:
    """A path on the machines (the ``nbcluster`` program, a CA file, a state directory):
    any printable text (it is quoted), not an option, no control character. A leading ``~/``
    is the home directory, where ssh sessions start: it is made relative (the shell would
    not expand a quoted ``~``)."""
    if not path:
        raise ValueError(f"{what} is empty")
    if bad := _control(path):
        raise ValueError(f"{what} {path!r} contains the control character {bad}")
    if len(path) > _MAX_VALUE:
        raise ValueError(f"{what} is over {_MAX_VALUE} characters")
    if path.startswith("-"):
        raise ValueError(f"{what} {path!r} starts with '-' (it would be read as an option)")
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    if path.startswith("~"):
        raise ValueError(
            f"{what} {path!r}: another user's home (~user) is not expanded; give the path"
        )
    return path


@dataclass(frozen=True)
class RemoteHost:
    """The ``nbcluster host`` command line of one machine, checked (no secret in it)."""

    nbcluster: str
    gateway_url: str
    name: str
    address: str
    log_level: str = "warning"
    gpus: int | None = None
    ca: str | None = None
    state_dir: str | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "nbcluster", validate_remote_path(self.nbcluster, "the nbcluster program")
        )
        validate_gateway_url(self.gateway_url)
        validate_host_name(self.name)
        validate_address(self.address)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r} is not one of {LOG_LEVELS}")
        if self.gpus is not None and not 0 <= self.gpus <= 4096:
            raise ValueError(f"gpus must be 0 to 4096, not {self.gpus}")
        if self.ca is not None:
            object.__setattr__(self, "ca", validate_remote_path(self.ca, "the CA file"))
        if self.state_dir is not None:
            object.__setattr__(
                self, "state_dir", validate_remote_path(self.state_dir, "the state directory")
            )
        for arg in self.extra_args:
            if bad := _control(arg):
                raise ValueError(f"host argument {arg!r} contains the control character {bad}")
            option = arg.split("=", 1)[0]
            if option in RESERVED_HOST_OPTIONS:
                raise ValueError(f"host argument {arg!r}: the ssh provider sets {option} itself")

    def argv(self) -> list[str]:
        argv = [self.nbcluster, "host", "--gateway", self.gateway_url, "--name", self.name]
        argv += ["--address", self.address, "--log-level", self.log_level]
        if self.gpus is not None:
            argv += ["--gpus", str(self.gpus)]
        if self.ca is not None:
            argv += ["--ca", self.ca]
        if self.state_dir is not None:
            argv += ["--state-dir", self.state_dir]
        return [*argv, *self.extra_args]


def remote_command(host: RemoteHost, grace: int) -> str:
    """The command line sent to the machine's sshd (module docstring): every word quoted."""
    if grace < 1:
        raise ValueError(f"the grace period must be 1 s or more, not {grace}")
    words = ["exec", "/bin/sh", "-c", SCRIPT, ARG0, str(grace), *host.argv()]
    return " ".join(shlex.quote(word) for word in words)
