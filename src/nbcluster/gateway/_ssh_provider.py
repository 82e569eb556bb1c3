"""Host daemons on plain machines over ssh (``nbcluster gateway --hosts-from ssh``): a fixed
list of machines, each running at most one ``nbcluster host``, started through its sshd.

The command each machine runs, how its values are checked and quoted, and how the join token
travels (the ssh channel's standard input, then the daemon's environment: never a command line,
a file or a log) are in ``_ssh_command``; the operator's side is in ``docs/ssh-hosts.md``.

* **Host keys** are verified against ``known_hosts`` (default ``~/.ssh/known_hosts`` of the
  gateway's user), read anew at each connection. A machine whose key is not there is refused
  with its fingerprint and what to do. With ``accept_unknown_hosts`` a machine *without* an
  entry is let in with a loud warning and its key is pinned for the provider's life; a key
  that differs from the file's entry, or from the pinned one, is always refused.
* **The user's key**: ``client_keys`` (files), else the ssh agent (``$SSH_AUTH_SOCK``) and
  ``~/.ssh/id_*``, as OpenSSH does. ``~/.ssh/config`` is read only if given as ``ssh_config``.
* **One connection per machine**, kept while its daemon runs (keepalives every 15 s; three
  unanswered: lost), one session on it for the daemon. Its output is forwarded to this log,
  line by line, and the last lines of its standard error are kept for error messages.
* **Restarts**: a daemon whose session ends while it should run (it exited, was killed, the
  connection was lost) is started again under the same name after a backoff (``restart_backoff``
  doubling, at most ``max_restart_backoff``), up to ``max_restarts`` times in a row; a daemon
  that ran ``stable_after`` seconds starts the count again. Past the bound the machine is given
  up on (logged as an error) until a later ``start_hosts`` picks it again.
* **Stopping**: closing the session's standard input ends the daemon (SIGTERM, SIGKILL to its
  process group ``stop_grace`` seconds later, by the session's own lifeline); a lost connection
  does the same, so a gateway that dies takes its ssh hosts with it. ``close()`` stops all.

Over 500 lines on purpose: one provider's lifecycle of a remote daemon (connect and check the
host key, start, watch, restart with backoff, stop through the lifeline) is one state machine
per machine whose steps share the slot's state and lock; the pure parts (parsing machines,
building and quoting the command) are already apart, in ``_ssh_command``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from ._errors import HostProviderError
from ._ssh_command import (
    MARKER,
    Machine,
    RemoteHost,
    host_names,
    merge_machines,
    parse_machine,
    parse_machines,
    remote_command,
    validate_gateway_url,
    validate_join_token,
    validate_user,
)

__all__ = ["SshHostProvider", "SshHostStatus"]

log = logging.getLogger(__name__)

#: Characters of one forwarded output line (longer ones are cut).
_LINE_LIMIT = 4000
#: Lines of a daemon's standard error kept for error messages.
_TAIL_LINES = 12
#: Seconds to wait, beyond the grace period, for a stopped daemon's session to end.
_STOP_MARGIN = 5.0


@dataclass(frozen=True)
class SshHostStatus:
    """One machine as the provider sees it (:meth:`SshHostProvider.status`)."""

    name: str
    machine: str
    #: ``stopped``, ``starting``, ``running``, ``restarting`` or ``failed`` (given up on).
    state: str
    #: The daemon's process id on the machine (also its process group), while it runs.
    pid: int | None
    #: Times it was started again after its session ended.
    restarts: int
    #: How its last session ended.
    last_exit: str | None


@dataclass
class _Run:
    """One session running a host daemon."""

    process: asyncssh.SSHClientProcess[bytes]
    started: float
    marker: asyncio.Future[int | None]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    pid: int | None = None


@dataclass
class _Slot:
    """One machine and the daemon it runs."""

    machine: Machine
    name: str
    #: Listed in ``--ssh-hosts`` (a general scale-out may use it), not only in kernelspecs'
    #: ``remote_hosts`` (started only for their kernels: ``start_hosts_among``).
    general: bool = True
    conn: asyncssh.SSHClientConnection | None = None
    run: _Run | None = None
    #: Starts the daemon, then restarts it; cancelled to stop it.
    task: asyncio.Task[None] | None = None
    state: str = "stopped"
    launched: bool = False
    restarts: int = 0
    last_exit: str | None = None

    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class _HostKeyCheck(asyncssh.SSHClient):
    """Decides on host keys that ``known_hosts`` does not list (asyncssh asks it only then)."""

    def __init__(
        self, provider: SshHostProvider, machine: Machine, known: asyncssh.SSHKnownHosts
    ) -> None:
        self.provider = provider
        self.machine = machine
        self.known = known
        #: Why the key was refused, for the error the connection then fails with.
        self.refusal: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.refusal = self.provider._judge_host_key(
            self.machine, host, addr, port, key, self.known
        )
        return self.refusal is None


def _why(process: asyncssh.SSHClientProcess[bytes]) -> str:
    """How a session ended, in words."""
    if process.exit_signal is not None:
        return f"was killed by SIG{process.exit_signal[0]}"
    if process.exit_status is not None:
        return f"exited with code {process.exit_status}"
    return "lost its ssh session (no exit status: the connection ended)"


class SshHostProvider:
    """Host daemons on ``machines`` (``[USER@]HOST[:PORT][/ADDRESS]``, a comma-separated
    string or a list), started over ssh; see the module docstring.

    ``nbcluster`` is the program on the machines (a name looked up in the ssh session's
    ``PATH``, a path, relative to the home directory or absolute). ``gpus_per_host`` None: the
    daemons find the machines' GPUs with NVML; a number: that many virtual GPUs. ``ca`` and
    ``state_dir`` are paths on the machines. ``host_args`` are more ``nbcluster host``
    arguments (``--gpu-devices 0,1``, ``--work-dir DIR``), each quoted.
    """

    name = "ssh"

    def __init__(
        self,
        machines: str | Iterable[str],
        gateway_url: str,
        join_token: str,
        *,
        kernelspec_machines: Iterable[str] = (),
        nbcluster: str = "nbcluster",
        user: str | None = None,
        known_hosts: Path | None = None,
        accept_unknown_hosts: bool = False,
        client_keys: Sequence[Path] = (),
        ssh_config: Path | None = None,
        gpus_per_host: int | None = None,
        ca: str | None = None,
        state_dir: str | None = None,
        host_args: Sequence[str] = (),
        log_level: str = "warning",
        name_prefix: str = "ssh",
        stop_grace: float = 10.0,
        connect_timeout: float = 15.0,
        max_restarts: int = 5,
        restart_backoff: float = 1.0,
        max_restart_backoff: float = 30.0,
        stable_after: float = 60.0,
        keepalive_interval: float = 15.0,
    ) -> None:
        general = parse_machines(machines) if machines else []
        parsed = merge_machines(general, [parse_machine(m) for m in kernelspec_machines])
        if not parsed:
            raise ValueError("no ssh machines given")
        names = host_names(parsed, name_prefix)
        self.gateway_url = validate_gateway_url(gateway_url)
        self._token_line = (validate_join_token(join_token) + "\n").encode()
        if user is not None:
            validate_user(user, "the ssh user: ")
        for number, value in (
            ("stop_grace", stop_grace),
            ("connect_timeout", connect_timeout),
            ("restart_backoff", restart_backoff),
            ("max_restart_backoff", max_restart_backoff),
            ("stable_after", stable_after),
            ("keepalive_interval", keepalive_interval),
        ):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{number} must be a positive number of seconds, not {value}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be 0 or more, not {max_restarts}")
        for key in client_keys:
            if not key.is_file():
                raise ValueError(f"ssh key file {key}: no such file")
        if ssh_config is not None and not ssh_config.is_file():
            raise ValueError(f"ssh config file {ssh_config}: no such file")
        self.known_hosts = (known_hosts or Path("~/.ssh/known_hosts")).expanduser()
        self.accept_unknown_hosts = accept_unknown_hosts
        self.client_keys = list(client_keys)
        self.ssh_config = ssh_config
        self.user = user
        self.stop_grace = stop_grace
        self.connect_timeout = connect_timeout
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.stable_after = stable_after
        self.keepalive_interval = keepalive_interval
        self._template = RemoteHost(
            nbcluster=nbcluster,
            gateway_url=gateway_url,
            name=names[0],
            address="127.0.0.1",
            log_level=log_level,
            gpus=gpus_per_host,
            ca=ca,
            state_dir=state_dir,
            extra_args=tuple(host_args),
        )
        self._slots = [
            _Slot(m, n, general=i < len(general))
            for i, (m, n) in enumerate(zip(parsed, names, strict=True))
        ]
        self._by_name = {slot.name: slot for slot in self._slots}
        #: Keys accepted as unknown (``accept_unknown_hosts``), by machine: a later
        #: connection must show the same one.
        self._pinned: dict[tuple[str, int], asyncssh.SSHKey] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        if accept_unknown_hosts:
            log.warning(
                "!!! ssh host provider: UNKNOWN HOST KEYS WILL BE ACCEPTED "
                "(--ssh-accept-unknown-hosts): a machine missing from %s is trusted on first "
                "use, so a first connection could be intercepted. Add the machines' keys to "
                "it and drop the option. !!!",
                self.known_hosts,
            )
        if self._template.gpus is not None and self._template.gpus > 0:
            log.info("ssh hosts report %d virtual GPUs each", self._template.gpus)

    def __repr__(self) -> str:
        return (
            f"SshHostProvider(machines={[str(s.machine) for s in self._slots]!r}, "
            f"gateway_url={self.gateway_url!r}, started={self.started()!r})"
        )

    # -- what each machine runs -----------------------------------------------------------------

    def machines(self) -> dict[str, Machine]:
        """Host name → machine, in the order given."""
        return {slot.name: slot.machine for slot in self._slots}

    def remote_host(self, name: str, address: str) -> RemoteHost:
        """The checked command line of the daemon ``name`` with ``--address address``."""
        slot = self._slot(name)
        return RemoteHost(
            nbcluster=self._template.nbcluster,
            gateway_url=self._template.gateway_url,
            name=slot.name,
            address=slot.machine.address or address,
            log_level=self._template.log_level,
            gpus=self._template.gpus,
            ca=self._template.ca,
            state_dir=self._template.state_dir,
            extra_args=self._template.extra_args,
        )

    def command(self, name: str, address: str) -> str:
        """What the machine of ``name`` is sent (no secret in it)."""
        return remote_command(self.remote_host(name, address), max(1, math.ceil(self.stop_grace)))

    def status(self) -> list[SshHostStatus]:
        return [
            SshHostStatus(
                name=slot.name,
                machine=str(slot.machine),
                state=slot.state,
                pid=slot.run.pid if slot.run is not None else None,
                restarts=slot.restarts,
                last_exit=slot.last_exit,
            )
            for slot in self._slots
        ]

    def _slot(self, name: str) -> _Slot:
        try:
            return self._by_name[name]
        except KeyError:
            raise HostProviderError(
                f"host {name!r} is not one of the ssh host provider's machines "
                f"({', '.join(self._by_name)})"
            ) from None

    # -- HostProvider ---------------------------------------------------------------------------

    async def start_hosts(self, count: int) -> list[str]:
        """Start daemons on up to ``count`` machines of ``--ssh-hosts`` that run none, in
        the order given; a machine that cannot be reached is passed over for the next one.
        Machines only kernelspecs name are left to :meth:`start_hosts_among`."""
        general = [slot for slot in self._slots if slot.general]
        return await self._start_on(count, general, "ssh machine", "list more machines")

    def hosts_of(self, machines: Iterable[str]) -> frozenset[str]:
        """The host names of these machines (a kernelspec's ``remote_hosts``): what the
        kernel manager confines its kernels to. Raises :class:`HostProviderError` for a
        machine this provider was not given."""
        by_key = {slot.machine.key: slot.name for slot in self._slots}
        names = set()
        for text in machines:
            try:
                machine = parse_machine(text)
            except ValueError as exc:
                raise HostProviderError(str(exc)) from None
            if machine.key not in by_key:
                raise HostProviderError(
                    f"ssh machine {machine} is not one of the ssh host provider's machines "
                    "(the gateway reads kernelspecs' remote_hosts when it starts)"
                )
            names.add(by_key[machine.key])
        return frozenset(names)

    async def start_hosts_among(self, count: int, names: Collection[str]) -> list[str]:
        """Like :meth:`start_hosts`, on the machines of these host names only (a kernel
        confined to its kernelspec's ``remote_hosts`` found too few of them running)."""
        among = [slot for slot in self._slots if slot.name in names]
        return await self._start_on(count, among, "machine of its kernelspec", "add machines")

    async def _start_on(
        self, count: int, slots: Sequence[_Slot], what: str, remedy: str
    ) -> list[str]:
        if count < 0:
            raise HostProviderError(f"cannot start {count} hosts")
        if self._closed:
            raise HostProviderError("the ssh host provider is closed")
        names: list[str] = []
        errors: list[str] = []
        async with self._lock:
            free = [slot for slot in slots if not slot.busy()]
            if count and not free:
                raise HostProviderError(
                    f"every {what} already runs a host daemon ({len(slots)} of "
                    f"{len(slots)}): {remedy} to scale out further"
                )
            while len(names) < count and free:
                batch, free = free[: count - len(names)], free[count - len(names) :]
                started = [self._start(slot) for slot in batch]
                results = await asyncio.gather(*started, return_exceptions=True)
                for slot, result in zip(batch, results, strict=True):
                    if isinstance(result, HostProviderError):
                        errors.append(str(result))
                    elif isinstance(result, asyncio.CancelledError):
                        errors.append(f"host {slot.name} was stopped while it started")
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        names.append(slot.name)
        if errors and not names:
            raise HostProviderError("; ".join(errors))
        if errors:
            log.warning(
                "started %d of %d ssh hosts; these failed: %s", len(names), count, "; ".join(errors)
            )
        return names

    def _start(self, slot: _Slot) -> asyncio.Future[int | None]:
        """Start the task that runs ``slot``'s daemon; the future says when it runs (its
        pid) or why it could not start."""
        started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        slot.state = "starting"
        slot.launched = True
        slot.task = asyncio.create_task(self._keep(slot, started), name=f"ssh host {slot.name}")
        return started

    async def stop_host(self, name: str) -> None:
        """Stop the daemon ``name`` (its session's lifeline: SIGTERM, then SIGKILL to its
        process group after ``stop_grace``) and close its connection. One that already ended
        is left as it is; a name this provider never started raises."""
        slot = self._slot(name)
        if not slot.launched:
            raise HostProviderError(f"host {name!r} was not started by the ssh host provider")
        await self._stop(slot)

    def owns(self, name: str) -> bool:
        slot = self._by_name.get(name)
        return slot is not None and slot.launched

    def started(self) -> list[str]:
        return [slot.name for slot in self._slots if slot.busy()]

    async def close(self) -> None:
        """Stop every daemon and close every connection."""
        self._closed = True
        slots = [s for s in self._slots if s.busy() or s.run is not None or s.conn is not None]
        results = await asyncio.gather(*(self._stop(s) for s in slots), return_exceptions=True)
        for slot, result in zip(slots, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not stop host %s on %s: %s", slot.name, slot.machine, result)

    # -- connecting -----------------------------------------------------------------------------

    def _read_known_hosts(self) -> asyncssh.SSHKnownHosts:
        try:
            text = self.known_hosts.read_text()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise HostProviderError(f"cannot read known_hosts {self.known_hosts}: {exc}") from exc
        try:
            return asyncssh.import_known_hosts(text)
        except (ValueError, asyncssh.Error) as exc:
            raise HostProviderError(f"known_hosts {self.known_hosts}: {exc}") from exc

    def _judge_host_key(
        self,
        machine: Machine,
        host: str,
        addr: str,
        port: int,
        key: asyncssh.SSHKey,
        known: asyncssh.SSHKnownHosts,
    ) -> str | None:
        """None to accept ``key``, which ``known`` does not list for this machine; else why
        it is refused."""
        fingerprint = key.get_fingerprint()
        listed = asyncssh.match_known_hosts(known, host, addr, None if port == 22 else port)
        if listed[0] or listed[1]:
            return (
                f"its host key {fingerprint} is NOT the one {self.known_hosts} lists for it: "
                "the connection may be intercepted, or the machine's key was changed (if you "
                "know it was, replace its line in that file)"
            )
        pinned = self._pinned.get(machine.key)
        if pinned is not None:
            if pinned.public_data == key.public_data:
                return None
            return (
                f"its host key {fingerprint} is not the one it showed before "
                f"({pinned.get_fingerprint()}), accepted as unknown: the connection may be "
                "intercepted"
            )
        if not self.accept_unknown_hosts:
            return (
                f"its host key {fingerprint} is not in {self.known_hosts}: check the "
                "fingerprint on the machine (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
                f"then add its key to that file (ssh-keyscan -p {machine.port} {machine.host}), "
                "or pass --ssh-accept-unknown-hosts to trust unknown machines on first use"
            )
        line = key.export_public_key().decode().strip()
        entry = machine.host if machine.port == 22 else f"[{machine.host}]:{machine.port}"
        log.warning(
            "!!! ssh machine %s: ACCEPTING ITS UNKNOWN HOST KEY %s (--ssh-accept-unknown-hosts): "
            "nothing proves this is the machine. To trust it, add this line to %s: %s %s !!!",
            machine,
            fingerprint,
            self.known_hosts,
            entry,
            line,
        )
        self._pinned[machine.key] = key
        return None

    async def _connect(self, slot: _Slot) -> asyncssh.SSHClientConnection:
        if slot.conn is not None and not slot.conn.is_closed():
            return slot.conn
        machine = slot.machine
        known = await asyncio.to_thread(self._read_known_hosts)
        check = _HostKeyCheck(self, machine, known)
        user = machine.user or self.user
        options: dict[str, object] = {}
        if user is not None:
            options["username"] = user
        if self.client_keys:
            options["client_keys"] = [str(k) for k in self.client_keys]
        try:
            conn, _ = await asyncssh.create_connection(
                lambda: check,
                machine.host,
                machine.port,
                known_hosts=known,
                config=[str(self.ssh_config)] if self.ssh_config is not None else [],
                connect_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=3,
                **options,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostProviderError(
                f"ssh machine {machine}: refused: {check.refusal or exc.reason}"
            ) from None
        except asyncssh.PermissionDenied as exc:
            keys = ", ".join(map(str, self.client_keys)) or "the ssh agent's and ~/.ssh/id_*"
            raise HostProviderError(
                f"ssh machine {machine}: authentication as {user or 'the local user'} failed "
                f"({exc.reason}); keys tried: {keys}"
            ) from None
        except (TimeoutError, OSError, asyncssh.Error, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise HostProviderError(f"ssh machine {machine}: cannot connect: {reason}") from None
        slot.conn = conn
        return conn

    def _drop_connection(self, slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None

    # -- running a daemon -----------------------------------------------------------------------

    async def _launch(self, slot: _Slot) -> _Run:
        """Start the daemon of ``slot`` in a new session; returns once it runs."""
        conn = await self._connect(slot)
        peer = conn.get_extra_info("peername")
        address = str(peer[0]) if peer else slot.machine.host
        try:
            command = self.command(slot.name, address)
        except ValueError as exc:
            raise HostProviderError(f"host {slot.name} on {slot.machine}: {exc}") from None
        try:
            process = await conn.create_process(command, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            self._drop_connection(slot)
            raise HostProviderError(
                f"ssh machine {slot.machine}: cannot open a session: {exc}"
            ) from None
        run = _Run(process, time.monotonic(), asyncio.get_running_loop().create_future())
        run.pumps = [
            asyncio.create_task(self._pump(slot, run, process.stdout, "stdout")),
            asyncio.create_task(self._pump(slot, run, process.stderr, "stderr")),
        ]
        try:
            process.stdin.write(self._token_line)
            run.pid = await asyncio.wait_for(run.marker, self.connect_timeout)
            if run.pid is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended(run), _STOP_MARGIN)
                raise HostProviderError(
                    f"host {slot.name} on {slot.machine} did not start: it "
                    f"{_why(process)}{self._tail(run)}"
                )
        except TimeoutError:
            process.close()
            raise HostProviderError(
                f"host {slot.name} on {slot.machine} did not start within "
                f"{self.connect_timeout} s{self._tail(run)}"
            ) from None
        except BaseException:
            process.close()
            raise
        log.info("started host %s on %s (pid %d there)", slot.name, slot.machine, run.pid)
        return run

    async def _pump(
        self,
        slot: _Slot,
        run: _Run,
        reader: asyncssh.SSHReader[bytes],
        stream: str,
    ) -> None:
        """Forward one output stream of a daemon's session to this log, line by line."""
        pending = b""
        try:
            while chunk := await reader.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(slot, run, stream, line)
                if len(pending) > _LINE_LIMIT:
                    self._line(slot, run, stream, pending)
                    pending = b""
        except (asyncssh.Error, OSError):
            pass  # the session ended; how is read from the process
        finally:
            if pending:
                self._line(slot, run, stream, pending)
            if stream == "stdout" and not run.marker.done():
                run.marker.set_result(None)

    def _line(self, slot: _Slot, run: _Run, stream: str, raw: bytes) -> None:
        # Rich pads the daemon's log lines to its console's width: the padding goes.
        text = raw.decode(errors="replace").rstrip()[:_LINE_LIMIT]
        if stream == "stdout" and not run.marker.done():
            found = MARKER.match(text)
            if found:
                run.marker.set_result(int(found.group(1)))
                return
        if not text:
            return
        if stream == "stderr":
            run.tail.append(text)
        log.info("host %s (%s): %s", slot.name, slot.machine, text)

    @staticmethod
    def _tail(run: _Run) -> str:
        return (": " + " | ".join(run.tail)) if run.tail else ""

    @staticmethod
    async def _ended(run: _Run) -> None:
        """Until the session of ``run`` has ended and its output has been read."""
        await run.process.wait_closed()
        await asyncio.gather(*run.pumps, return_exceptions=True)

    async def _keep(self, slot: _Slot, started: asyncio.Future[int | None]) -> None:
        """Start ``slot``'s daemon, then start it again whenever its session ends, within
        the bounds (module docstring). Cancelled to stop it."""
        try:
            try:
                run = await self._launch(slot)
            except Exception as exc:
                if not isinstance(exc, HostProviderError):
                    log.exception("starting host %s on %s failed", slot.name, slot.machine)
                    exc = HostProviderError(f"host {slot.name} on {slot.machine}: {exc!r}")
                started.set_exception(exc)
                slot.state = "stopped"
                slot.last_exit = str(exc)
                self._drop_connection(slot)
                return
            slot.run = run
            slot.state = "running"
            started.set_result(run.pid)
            await self._supervise(slot, run)
        except Exception:
            log.exception("the supervision of host %s on %s failed", slot.name, slot.machine)
            slot.state = "failed"
        finally:
            if not started.done():
                started.cancel()

    async def _supervise(self, slot: _Slot, run: _Run) -> None:
        """Start ``slot``'s daemon again whenever its session ends, within the bounds."""
        failures = 0
        while True:
            await self._ended(run)
            why = f"{_why(run.process)}{self._tail(run)}"
            slot.run = None
            slot.last_exit = why
            if time.monotonic() - run.started >= self.stable_after:
                failures = 0
            while True:
                failures += 1
                if failures > self.max_restarts:
                    slot.state = "failed"
                    log.error(
                        "host %s on %s %s; given up after %d restarts in a row (a later "
                        "scale-out may pick the machine again)",
                        slot.name,
                        slot.machine,
                        why,
                        self.max_restarts,
                    )
                    self._drop_connection(slot)
                    return
                delay = min(self.restart_backoff * 2 ** (failures - 1), self.max_restart_backoff)
                slot.state = "restarting"
                log.warning(
                    "host %s on %s %s; starting it again in %.1f s (%d of %d)",
                    slot.name,
                    slot.machine,
                    why,
                    delay,
                    failures,
                    self.max_restarts,
                )
                await asyncio.sleep(delay)
                try:
                    run = await self._launch(slot)
                except HostProviderError as exc:
                    why = f"could not be started again: {exc}"
                    continue
                break
            slot.run = run
            slot.state = "running"
            slot.restarts += 1

    async def _stop(self, slot: _Slot) -> None:
        task, slot.task = slot.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        run, slot.run = slot.run, None
        try:
            if run is not None and not run.process.is_closing():
                await self._end(slot, run)
        finally:
            slot.state = "stopped"
            self._drop_connection(slot)

    async def _end(self, slot: _Slot, run: _Run) -> None:
        """End a running daemon through its session's lifeline (module docstring)."""
        with contextlib.suppress(asyncssh.Error, OSError, BrokenPipeError):
            run.process.stdin.write_eof()
        wait = self.stop_grace + _STOP_MARGIN
        try:
            await asyncio.wait_for(self._ended(run), wait)
        except TimeoutError:
            log.warning(
                "host %s on %s (pid %s) still runs %.0f s after it was told to stop; closing "
                "its ssh connection",
                slot.name,
                slot.machine,
                run.pid,
                wait,
            )
            run.process.close()
            self._drop_connection(slot)
            try:
                await asyncio.wait_for(self._ended(run), _STOP_MARGIN)
            except TimeoutError:
                raise HostProviderError(
                    f"could not confirm that host {slot.name} on {slot.machine} (pid {run.pid} "
                    "there) stopped: its session did not end"
                ) from None
        slot.last_exit = _why(run.process)
        log.info("stopped host %s on %s: it %s", slot.name, slot.machine, slot.last_exit)
