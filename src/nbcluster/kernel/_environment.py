"""What a cell changes outside its namespace, carried to the other replicas: the interpreter
state (``_interpreter``'s probes: environment variables, working directory, ``sys.path``,
random generators, ``decimal`` context, display precision ...) and package installs
(``_packages``: ``%pip install`` runs on every replica, and on replicas that join later).

Owned by :class:`~._sync.StateSynchronizer`: ``capture`` on the executor after each cell,
``apply`` on the others when they apply its payload. Interpreter state that lives in context
variables (the ``decimal`` context, NumPy's print options) only reaches the cells if restored
in the context the cells run in, so the replica that executes next calls
``restore_pending`` just before its cell (the kernel does, from ``do_execute``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _interpreter as interpreter
from ._packages import (
    PackageCommand,
    PackageCommandError,
    from_primitive,
    package_commands,
    run_package_command,
    to_primitive,
)

__all__ = ["EnvironmentCapture", "ReplicaEnvironment"]

log = logging.getLogger(__name__)

#: How long one replayed package command may take on a replica.
PACKAGE_TIMEOUT = 900.0


@dataclass(frozen=True, slots=True)
class EnvironmentCapture:
    """What changed outside the namespace in one cell."""

    #: probe name -> encoded value, only the probes whose state changed
    interp: dict[str, bytes] = field(default_factory=dict)
    #: package commands to replay, as primitives
    packages: list[Any] = field(default_factory=list)
    #: package commands of the cell, for the note to the user
    commands: tuple[PackageCommand, ...] = ()
    #: things that cannot travel ("probe: sentence"), for a warning
    problems: tuple[str, ...] = ()


class ReplicaEnvironment:
    """One replica's view of the interpreter state and package installs."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        #: the state as last captured or applied here
        self._state: dict[str, object] = {}
        #: the state applied from other replicas that the next cell here must see
        self._pending: dict[str, object] = {}
        if shell is not None:
            self._state = interpreter.capture_all(shell)

    # -- executor side ----------------------------------------------------------------------

    def capture(self, raw: str | None, ran: bool) -> EnvironmentCapture:
        """After a cell: the interpreter state it changed, and its package installs (only if
        the cell ran to the end: a failed cell may have run some of them, or none)."""
        if self.shell is None:
            return EnvironmentCapture()
        problems: list[str] = []
        current = interpreter.capture_all(self.shell, problems=problems)
        changed = interpreter.changed(self._state, current)
        self._state = current
        self._pending.clear()
        encoded = {name: interpreter.encode_state({name: value}) for name, value in changed.items()}
        commands: tuple[PackageCommand, ...] = ()
        if ran and raw:
            try:
                commands = tuple(c for c in package_commands(raw) if c.replayable)
            except Exception:
                log.exception("could not look for package commands in a cell")
        return EnvironmentCapture(
            interp=encoded,
            packages=to_primitive(commands) if commands else [],
            commands=commands,
            problems=tuple(problems),
        )

    def encoded_state(self) -> bytes:
        """The interpreter state as last captured or applied here (before the cell now being
        captured), encoded: a cell run again elsewhere needs it (``_recompute``)."""
        return interpreter.encode_state(self._state)

    # -- other replicas ---------------------------------------------------------------------

    @contextlib.contextmanager
    def state_before(self, encoded: bytes) -> Iterator[None]:
        """Run a block with the interpreter state another replica had before one of its cells
        (``encoded_state`` there), then restore this replica's state (``_recompute``)."""
        if self.shell is None:
            yield
            return
        interpreter.restore_all(self.shell, interpreter.decode_state(encoded))
        try:
            yield
        finally:
            interpreter.restore_all(self.shell, self._state)

    def apply(self, interp: Mapping[str, bytes], packages: Sequence[Any]) -> list[str]:
        """Apply another replica's changes; returns problems (never raises). Process-wide
        state (working directory, ``sys.path``, environment) is restored at once, because the
        values loaded next may import the user's modules; all of it again before the next
        cell that runs here (``restore_pending``)."""
        problems: list[str] = []
        state: dict[str, object] = {}
        for name, data in interp.items():
            try:
                state.update(interpreter.decode_state(data))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if state and self.shell is not None:
            problems.extend(interpreter.restore_all(self.shell, state))
            self._state.update(state)
            self._pending.update(state)
        if packages:
            problems.extend(self._replay(packages))
        for problem in problems:
            log.warning("environment of another replica: %s", problem)
        return problems

    def _replay(self, packages: Sequence[Any]) -> list[str]:
        try:
            commands = from_primitive(list(packages))
        except PackageCommandError as exc:
            return [f"packages: {exc}"]
        problems = []
        for command in commands:
            result = run_package_command(command, timeout=PACKAGE_TIMEOUT)
            log.info("replayed %s", result.describe())
            if not result.ok:
                problems.append(f"packages: {result.describe()}")
        return problems

    def restore_pending(self) -> list[str]:
        """Before a cell runs here after other replicas ran the previous ones: restore their
        interpreter state in the cells' own context."""
        if not self._pending or self.shell is None:
            return []
        pending, self._pending = self._pending, {}
        return interpreter.restore_all(self.shell, pending)
