"""The probes of the Python runtime's own state: ``os.environ``, the working directory,
``sys.path``, the recursion limit, the ``decimal`` context and the global random generators
(``random``, NumPy's legacy one, torch's CPU one).

Each class here is one :class:`~nbcluster.kernel._interpreter_base.InterpreterProbe`; nothing
calls them directly: :data:`nbcluster.kernel._interpreter.DEFAULT_PROBES` holds one instance of
each, and :func:`~nbcluster.kernel._interpreter.capture_all` calls their ``capture`` on the
executor after every cell, :func:`~nbcluster.kernel._interpreter.restore_all` their
``restore`` on the other replicas when they apply a cell's state update. The IPython and NumPy
display probes are in :mod:`nbcluster.kernel._interpreter_ipython`.
:func:`environ_excluded` and its two tables are public (re-exported by
:mod:`nbcluster.kernel._interpreter`).
"""

from __future__ import annotations

import decimal
import os
import random
import sys
from typing import Any, Final

from .. import envvars
from ._interpreter_base import (
    NOT_APPLICABLE,
    InterpreterRestoreError,
    Lossy,
    _expect,
    _importing,
    _loaded,
    _plain,
    _show,
)

__all__ = [
    "ENVIRON_EXCLUDED_NAMES",
    "ENVIRON_EXCLUDED_PREFIXES",
    "environ_excluded",
]

# ---------------------------------------------------------------------------------------------
# os.environ

ENVIRON_EXCLUDED_PREFIXES: Final = (envvars.PREFIX, "JPY_")
"""Environment variables never captured nor restored, by prefix. ``NBCLUSTER_*``: set per replica
by the host daemon and the gateway (kernel and replica id, Raft password, report fd, GPUs bound
to the cell); ``JPY_*``: set per process by the launcher (parent pid, session name, interrupt
event)."""

ENVIRON_EXCLUDED_NAMES: Final = frozenset(
    {
        # Bound per replica and per cell by the GPU binding (nbcluster.kernel._gpus); the
        # device order is the host operator's choice.
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        # jupyter_client's launcher, per process (Windows interrupt handle).
        "IPY_INTERRUPT_EVENT",
        # Describe the host or the process's shell, not the notebook: copying them would make
        # a follower claim to be the executor's host; the directory is the "cwd" probe's.
        "HOSTNAME",
        "PWD",
        "OLDPWD",
    }
)
"""Environment variables never captured nor restored, by exact name (see the comments)."""


def environ_excluded(key: str) -> bool:
    """Whether the environment variable ``key`` is per process or per host (never synchronised).

    Called by the ``environ`` probe for every variable, at capture and at restore.
    """
    return key in ENVIRON_EXCLUDED_NAMES or key.startswith(ENVIRON_EXCLUDED_PREFIXES)


class _Environ:
    """``os.environ`` minus the per-process variables, as a ``dict[str, str]``."""

    name = "environ"

    def capture(self, shell: Any) -> object:
        return {k: v for k, v in os.environ.items() if not environ_excluded(k)}

    def restore(self, shell: Any, value: object) -> None:
        wanted = _expect(value, dict, "a dict of environment variables")
        problems = []
        for key in [k for k in os.environ if not environ_excluded(k) and k not in wanted]:
            del os.environ[key]
        for key, text in wanted.items():
            if not isinstance(key, str) or not isinstance(text, str):
                problems.append(f"{_show(key)}={_show(text)} is not a pair of strings")
            elif not environ_excluded(key) and os.environ.get(key) != text:
                try:
                    os.environ[key] = text
                except (ValueError, OSError) as exc:  # NUL or '=' in the name, too long ...
                    problems.append(f"{key}: {exc}")
        if problems:
            raise InterpreterRestoreError("could not set " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Working directory, sys.path, recursion limit


class _Cwd:
    """The working directory (``os.chdir``, ``%cd``)."""

    name = "cwd"

    def capture(self, shell: Any) -> object:
        try:
            return os.getcwd()
        except OSError as exc:  # the directory was removed under us
            return Lossy(NOT_APPLICABLE, (f"the working directory is gone ({exc})",))

    def restore(self, shell: Any, value: object) -> None:
        path = _expect(value, str, "a directory path")
        try:
            here = os.getcwd()
        except OSError:
            here = "(a removed directory)"
        if path == here:
            return
        try:
            os.chdir(path)
        except OSError as exc:
            # The hosts need not share filesystems: the cell must still run, in the directory
            # this replica has, and the user must know it is not the executor's.
            raise InterpreterRestoreError(
                f"the working directory {path!r} is not available on this host "
                f"({exc.strerror or exc}); cells run in {here!r}"
            ) from None


class _SysPath:
    """``sys.path``, restored in place so that references to the list stay valid."""

    name = "sys_path"

    def capture(self, shell: Any) -> object:
        entries = sys.path
        if all(type(e) is str for e in entries):
            return list(entries)
        kept: list[object] = []
        dropped: list[str] = []
        for entry in entries:
            if isinstance(entry, str | bytes):
                kept.append(entry if type(entry) in (str, bytes) else _plain(entry)[1])
            elif isinstance(entry, os.PathLike):
                kept.append(os.fspath(entry))
            else:
                dropped.append(_show(entry))
        if dropped:
            return Lossy(kept, (f"sys.path entries that are not paths: {', '.join(dropped)}",))
        return kept

    def restore(self, shell: Any, value: object) -> None:
        entries = _expect(value, list | tuple, "a list of paths")
        if not all(isinstance(e, str | bytes) for e in entries):
            raise InterpreterRestoreError(f"sys.path entries must be strings: {_show(entries)}")
        if sys.path != list(entries):
            sys.path[:] = entries


class _RecursionLimit:
    """``sys.setrecursionlimit``."""

    name = "recursion_limit"

    def capture(self, shell: Any) -> object:
        return sys.getrecursionlimit()

    def restore(self, shell: Any, value: object) -> None:
        limit = _expect(value, int, "an int")
        if limit != sys.getrecursionlimit():
            sys.setrecursionlimit(limit)


# ---------------------------------------------------------------------------------------------
# decimal

_DECIMAL_SIGNALS: Final = {
    s.__name__: s
    for s in (
        decimal.Clamped,
        decimal.DivisionByZero,
        decimal.FloatOperation,
        decimal.Inexact,
        decimal.InvalidOperation,
        decimal.Overflow,
        decimal.Rounded,
        decimal.Subnormal,
        decimal.Underflow,
    )
}
_DECIMAL_FIELDS: Final = ("prec", "Emin", "Emax", "capitals", "clamp")


class _DecimalContext:
    """``decimal.getcontext()``: precision, rounding, exponent limits, flags and traps.

    Restored by changing the current context object in place (not ``setcontext``), so that
    every asyncio context sharing that object sees the change.
    """

    name = "decimal_context"

    def capture(self, shell: Any) -> object:
        ctx = decimal.getcontext()
        return {
            "prec": ctx.prec,
            "rounding": ctx.rounding,
            "Emin": ctx.Emin,
            "Emax": ctx.Emax,
            "capitals": ctx.capitals,
            "clamp": ctx.clamp,
            # Sorted names: the dicts of signal classes are not plain data.
            "flags": sorted(s.__name__ for s, on in ctx.flags.items() if on),
            "traps": sorted(s.__name__ for s, on in ctx.traps.items() if on),
        }

    def restore(self, shell: Any, value: object) -> None:
        data = _expect(value, dict, "a dict of decimal context fields")
        ints = {f: _expect(data.get(f), int, f"an int for {f}") for f in _DECIMAL_FIELDS}
        rounding = _expect(data.get("rounding"), str, "a str for rounding")
        signals = {}
        for field in ("flags", "traps"):
            names = _expect(data.get(field), list | tuple, f"a list of signal names for {field}")
            unknown = [n for n in names if n not in _DECIMAL_SIGNALS]
            if unknown:
                raise InterpreterRestoreError(f"unknown decimal signals {unknown} in {field}")
            signals[field] = set(names)
        # Validate everything on a copy first, so a bad value leaves the context unchanged.
        ctx = decimal.getcontext()
        trial = ctx.copy()
        for target in (trial, ctx):
            for field, number in ints.items():
                setattr(target, field, number)
            target.rounding = rounding
            for name, signal in _DECIMAL_SIGNALS.items():
                target.flags[signal] = name in signals["flags"]
                target.traps[signal] = name in signals["traps"]


# ---------------------------------------------------------------------------------------------
# Random generators


class _RandomState:
    """The ``random`` module's global generator (``random.seed``, ``random.random`` ...)."""

    name = "random_state"

    def capture(self, shell: Any) -> object:
        return random.getstate()

    def restore(self, shell: Any, value: object) -> None:
        state = _expect(value, list | tuple, "random.getstate()'s tuple")
        if len(state) != 3:
            raise InterpreterRestoreError(f"expected 3 items in random's state, got {len(state)}")
        version, internal, gauss = state
        _expect(internal, list | tuple, "a tuple of ints in random's state")
        random.setstate((version, tuple(internal), gauss))


class _NumpyRandomState:
    """NumPy's legacy global generator (``np.random.seed``, ``np.random.rand`` ...), as
    ``("MT19937", key bytes little-endian, pos, has_gauss, cached_gaussian)``."""

    name = "numpy_random_state"

    def capture(self, shell: Any) -> object:
        np = _loaded("numpy")
        if np is None:
            return NOT_APPLICABLE
        state = np.random.get_state(legacy=True)
        if not isinstance(state, tuple):
            kind = state.get("bit_generator", "?") if isinstance(state, dict) else "?"
            return Lossy(
                NOT_APPLICABLE,
                (f"NumPy's global generator uses {kind}, only MT19937 can be carried over",),
            )
        kind, keys, pos, has_gauss, cached = state
        return (
            str(kind),
            keys.astype("<u4", copy=False).tobytes(),
            int(pos),
            int(has_gauss),
            float(cached),
        )

    def restore(self, shell: Any, value: object) -> None:
        state = _expect(value, list | tuple, "a tuple (MT19937 state)")
        if len(state) != 5 or state[0] != "MT19937" or not isinstance(state[1], bytes):
            raise InterpreterRestoreError(f"not an MT19937 state: {_show(state)}")
        np = _importing("numpy")
        keys = np.frombuffer(state[1], dtype="<u4").astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, _expect(state[2], int, "an int position"), state[3], state[4])
        )


class _TorchRandomState:
    """torch's CPU generator (``torch.manual_seed``, ``torch.rand``), as bytes; the CUDA
    generators are left alone: touching ``torch.cuda`` would initialise CUDA on a replica that
    may hold no GPU."""

    name = "torch_random_state"

    def capture(self, shell: Any) -> object:
        torch = _loaded("torch")
        if torch is None:
            return NOT_APPLICABLE
        return torch.random.get_rng_state().numpy().tobytes()

    def restore(self, shell: Any, value: object) -> None:
        data = _expect(value, bytes, "bytes (torch's generator state)")
        torch = _importing("torch")
        torch.random.set_rng_state(torch.frombuffer(bytearray(data), dtype=torch.uint8))
