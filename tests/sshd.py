"""A throw-away OpenSSH server on loopback, for the tests of the ssh host provider.

::

    from ..sshd import Sshd, require_sshd

    require_sshd()                     # skip (or fail, under NBCLUSTER_TEST_REQUIRE_SSHD=1)
    with Sshd(tmp_path / "sshd", addresses=("127.0.0.1", "127.0.0.2"), ports=2) as sshd:
        sshd.write_known_hosts(path)   # a known_hosts file trusting every address and port
        ... connect as sshd.user with the key sshd.user_key ...

Debian's ``openssh-server`` (``/usr/sbin/sshd``) is started with no configuration file
(``-f /dev/null``), a host key and a user key made for the test with ``ssh-keygen``, public-key
authentication only, listening on loopback addresses and ports of the test's choosing. Several
"machines" are the same sshd reached at different loopback addresses (the whole of
127.0.0.0/8 is loopback on Linux) or ports. The server logs to ``<directory>/sshd.log``
(``-e``: its stderr); :meth:`Sshd.log` returns it for failure messages.

``/usr/sbin/sshd`` is needed (``apt-get install -y openssh-server``): without it the tests
that use it are skipped with that reason, or fail under ``NBCLUSTER_TEST_REQUIRE_SSHD=1``
(set by ``.ci/run``), so that CI never passes by skipping. sshd runs as the test's user and
lets only that user in; as root it needs its privilege-separation directory ``/run/sshd``,
made here.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import psutil
import pytest

from .cluster import free_port

__all__ = ["REQUIRE_ENV", "SSHD", "Sshd", "require_sshd"]

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
#: Set to 1 to make a missing sshd a failure rather than a skip (CI).
REQUIRE_ENV = "NBCLUSTER_TEST_REQUIRE_SSHD"
#: Seconds sshd may take to answer on every address and port.
START_TIMEOUT = 15.0


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the sshd tests must run)", pytrace=False)
    pytest.skip(reason)


def require_sshd() -> None:
    """Skip the test (fail it under ``NBCLUSTER_TEST_REQUIRE_SSHD=1``) without an sshd."""
    if not os.access(SSHD, os.X_OK):
        _unavailable(f"{SSHD} is not installed (apt-get install -y openssh-server)")
    try:
        subprocess.run([SSH_KEYGEN, "-?"], capture_output=True, timeout=10, check=False)
    except OSError:
        _unavailable("ssh-keygen is not installed (apt-get install -y openssh-client)")


def keygen(path: Path) -> Path:
    """A new ed25519 key pair without a passphrase at ``path`` (and ``path.pub``)."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "nbcluster-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def _banner(address: str, port: int) -> bool:
    """Whether an ssh server answers at ``address:port`` with its version banner."""
    try:
        with socket.create_connection((address, port), timeout=1) as sock:
            sock.settimeout(1)
            return sock.recv(8).startswith(b"SSH-2.0")
    except OSError:
        return False


class Sshd:
    """An sshd listening on every address of ``addresses`` at ``ports`` free ports each."""

    def __init__(
        self, directory: Path, addresses: Sequence[str] = ("127.0.0.1",), ports: int = 1
    ) -> None:
        if not addresses or ports < 1:
            raise ValueError("an sshd needs at least one address and one port")
        self.directory = directory
        self.addresses = tuple(addresses)
        self.ports = [free_port() for _ in range(ports)]
        #: Who may log in: the test's own user.
        self.user = getpass.getuser()
        self.host_key = directory / "host_key"
        self.user_key = directory / "user_key"
        self.authorized_keys = directory / "authorized_keys"
        self.log_path = directory / "sshd.log"
        self.pid_file = directory / "sshd.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        #: Everything sshd forked (a process per connection, the commands of its sessions),
        #: seen while it ran: what :meth:`stop` makes sure is gone.
        self._seen: dict[int, psutil.Process] = {}

    @property
    def host_public_key(self) -> str:
        """The host key as known_hosts has it: ``ssh-ed25519 AAAA...``."""
        algorithm, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{algorithm} {blob}"

    def known_hosts_line(self, address: str, port: int, key: str | None = None) -> str:
        """The known_hosts line of ``address:port`` (with another ``key`` if given)."""
        host = address if port == 22 else f"[{address}]:{port}"
        return f"{host} {key or self.host_public_key}"

    def write_known_hosts(
        self, path: Path, skip: Sequence[tuple[str, int]] = (), key: str | None = None
    ) -> Path:
        """A known_hosts file trusting this sshd at every address and port but those in
        ``skip`` (with ``key`` instead of its own, if given)."""
        lines = [
            self.known_hosts_line(address, port, key)
            for address in self.addresses
            for port in self.ports
            if (address, port) not in skip
        ]
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def start(self) -> Sshd:
        require_sshd()
        self.directory.mkdir(parents=True, exist_ok=True)
        keygen(self.host_key)
        keygen(self.user_key)
        self.authorized_keys.write_text(self.user_key.with_suffix(".pub").read_text())
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        argv = [
            str(SSHD), "-D", "-e", "-f", "/dev/null", "-h", str(self.host_key),
            *(arg for port in self.ports for arg in ("-p", str(port))),
            *(arg for address in self.addresses for arg in ("-o", f"ListenAddress={address}")),
            "-o", f"AuthorizedKeysFile={self.authorized_keys}",
            "-o", f"PidFile={self.pid_file}",
            "-o", "StrictModes=no",
            "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", "PermitRootLogin=prohibit-password",
            "-o", "UsePAM=no",
            "-o", "MaxStartups=100",
            "-o", "MaxSessions=50",
            "-o", "LogLevel=VERBOSE",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        pending = [(a, p) for a in self.addresses for p in self.ports]
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with code {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not answer at {pending} in {START_TIMEOUT} s")
            pending = [(a, p) for a, p in pending if not _banner(a, p)]
            if pending:
                time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        """The live processes sshd forked (connections, and the commands they run)."""
        if self.proc is None:
            return []
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        for proc in found:
            self._seen.setdefault(proc.pid, proc)
        return found

    def stop(self) -> None:
        """Stop sshd and kill whatever its sessions left running (a test that fails must not
        leave host daemons behind)."""
        if self.proc is None:
            return
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for proc in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        psutil.wait_procs(list(self._seen.values()), timeout=5)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
