"""Host providers: what the gateway calls on to start and stop host daemons when it scales.

A provider only launches and stops host daemons; the hosts it starts register with the gateway
on their own, like any other host. :class:`LocalProcessHostProvider`, the embedded default,
runs them as child processes of the gateway on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .. import envvars
from ._errors import HostProviderError

__all__ = ["HostProvider", "HostProviderError", "LocalProcessHostProvider", "MachineHostProvider"]

log = logging.getLogger(__name__)

# How long a child killed with SIGKILL may take to be reaped before stop_host gives up on it.
_KILL_TIMEOUT = 5.0


@runtime_checkable
class HostProvider(Protocol):
    """Starts and stops host daemons for the gateway."""

    name: str

    async def start_hosts(self, count: int) -> list[str]:
        """Start up to ``count`` hosts and return the names of those launched.

        They register with the gateway on their own. Raises :class:`HostProviderError` when no
        host can be started.
        """
        ...

    async def stop_host(self, name: str) -> None:
        """Stop a host this provider started: SIGTERM, then a kill after a grace period.

        Raises :class:`HostProviderError` for a name it never started.
        """
        ...

    def owns(self, name: str) -> bool:
        """Whether this provider started the host called ``name``."""
        ...

    def started(self) -> list[str]:
        """The names of the live hosts this provider started."""
        ...

    async def close(self) -> None:
        """Stop every host this provider started; called when the gateway stops."""
        ...


@runtime_checkable
class MachineHostProvider(HostProvider, Protocol):
    """A provider whose hosts are named machines (``ssh``): kernels can be confined to some of
    them (a kernelspec's ``remote_hosts``), and it starts daemons on those when asked."""

    def hosts_of(self, machines: Iterable[str]) -> frozenset[str]:
        """The host names of these machines; :class:`HostProviderError` for one it lacks."""
        ...

    async def start_hosts_among(self, count: int, names: Collection[str]) -> list[str]:
        """Start up to ``count`` hosts, only of these names (as :meth:`start_hosts`)."""
        ...


class LocalProcessHostProvider:
    """Host daemons as child processes of the gateway, on this machine.

    Each child runs ``<argv_prefix> host --gateway URL --name NAME --gpus N --state-dir DIR
    --log-level L --parent-pid <gateway pid>`` with the join token in ``NBCLUSTER_JOIN_TOKEN``
    (never on the command line), stdin from ``/dev/null`` and the gateway's stdout and stderr. Names are
    ``<name_prefix>-<n>`` with ``n`` counting up from 1, never reused while the provider lives.

    Children are spawned from the event loop's thread: ``--parent-pid`` makes them die with
    the thread that forked them (``PR_SET_PDEATHSIG``), so they must not be forked from a
    short-lived worker thread. A child that exits on its own is reaped and forgotten.
    """

    name = "local"

    def __init__(
        self,
        gateway_url: str,
        join_token: str,
        state_dir: Path,
        gpus_per_host: int,
        log_level: str = "warning",
        name_prefix: str = "auto",
        argv_prefix: Sequence[str] | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        if gpus_per_host < 0:
            raise ValueError(f"gpus_per_host must be 0 or more, not {gpus_per_host}")
        if stop_grace < 0:
            raise ValueError(f"stop_grace must be 0 or more, not {stop_grace}")
        if not name_prefix:
            raise ValueError("name_prefix must not be empty")
        self.gateway_url = gateway_url
        self.state_dir = state_dir
        self.gpus_per_host = gpus_per_host
        self.log_level = log_level
        self.name_prefix = name_prefix
        self.argv_prefix: list[str] = (
            [sys.executable, "-m", "nbcluster"] if argv_prefix is None else list(argv_prefix)
        )
        if not self.argv_prefix:
            raise ValueError("argv_prefix must not be empty")
        self.stop_grace = stop_grace
        self._join_token = join_token
        self._numbers = itertools.count(1)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._reapers: dict[str, asyncio.Task[None]] = {}
        self._launched: set[str] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"LocalProcessHostProvider(gateway_url={self.gateway_url!r}, "
            f"name_prefix={self.name_prefix!r}, started={self.started()!r})"
        )

    def argv(self, name: str) -> list[str]:
        """The command line of the host daemon called ``name`` (no secrets in it)."""
        return [
            *self.argv_prefix,
            "host",
            "--gateway",
            self.gateway_url,
            "--name",
            name,
            "--gpus",
            str(self.gpus_per_host),
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            self.log_level,
            "--parent-pid",
            str(os.getpid()),
        ]

    async def start_hosts(self, count: int) -> list[str]:
        if count < 0:
            raise HostProviderError(f"cannot start {count} hosts")
        if self._closed:
            raise HostProviderError("the local host provider is closed")
        env = {
            **{k: v for k, v in os.environ.items() if k != envvars.TOKEN.name},
            envvars.JOIN_TOKEN.name: self._join_token,
        }
        names: list[str] = []
        for _ in range(count):
            name = f"{self.name_prefix}-{next(self._numbers)}"
            argv = self.argv(name)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, env=env
                )
            except (OSError, ValueError) as exc:
                if not names:
                    raise HostProviderError(
                        f"cannot start host daemon {name} ({argv[0]}): {exc}"
                    ) from exc
                log.warning(
                    "started %d of %d host daemons; %s failed: %s", len(names), count, name, exc
                )
                break
            self._procs[name] = proc
            self._launched.add(name)
            self._reapers[name] = asyncio.create_task(
                self._reap(name, proc), name=f"reap host {name}"
            )
            names.append(name)
            log.info("started host daemon %s (pid %d)", name, proc.pid)
            if self._closed:
                # close() ran while this child was being spawned: it must not outlive it.
                await self.stop_host(name)
                raise HostProviderError("the local host provider was closed while starting hosts")
        return names

    async def _reap(self, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._procs.get(name) is proc:
            del self._procs[name]
        self._reapers.pop(name, None)
        log.info("host daemon %s (pid %d) exited with code %d", name, proc.pid, code)

    async def stop_host(self, name: str, grace: float | None = None) -> None:
        """Stop the host daemon ``name``: SIGTERM, then SIGKILL after ``grace`` seconds (the
        provider's ``stop_grace`` by default). A host it started that has already exited is
        left as it is; a name it never started raises :class:`HostProviderError`."""
        if name not in self._launched:
            raise HostProviderError(f"host {name!r} was not started by the local host provider")
        proc = self._procs.get(name)
        if proc is None or proc.returncode is not None:
            return
        grace = self.stop_grace if grace is None else grace
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            try:
                await asyncio.wait_for(proc.wait(), grace)
                return
            except TimeoutError:
                log.warning(
                    "host daemon %s (pid %d) still running %.1f s after SIGTERM; killing it",
                    name,
                    proc.pid,
                    grace,
                )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            try:
                await asyncio.wait_for(proc.wait(), _KILL_TIMEOUT)
            except TimeoutError:
                raise HostProviderError(
                    f"host daemon {name} (pid {proc.pid}) did not exit after SIGKILL"
                ) from None
        finally:
            if proc.returncode is None:
                # Cancelled while waiting: do not leave the child running unsupervised.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def owns(self, name: str) -> bool:
        return name in self._launched

    def started(self) -> list[str]:
        return [name for name, proc in self._procs.items() if proc.returncode is None]

    async def close(self, grace: float | None = None) -> None:
        self._closed = True
        names = list(self._procs)
        results = await asyncio.gather(
            *(self.stop_host(name, grace) for name in names), return_exceptions=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not stop host daemon %s: %s", name, result)
        reapers = list(self._reapers.values())
        if reapers:
            # Each has finished or will as soon as the loop hands it its child's exit.
            await asyncio.wait(reapers, timeout=_KILL_TIMEOUT)
