"""The probes of library settings a cell changes in place: ``warnings`` filters, NumPy's
floating-point error handling (``np.seterr``), pandas options and IPython's traceback mode
(``%xmode``).

Like the other probe modules, nothing calls these classes directly:
:data:`nbcluster.kernel._interpreter.DEFAULT_PROBES` holds one instance of each, captured on the
executor after every cell and restored on the other replicas (before their next cell too:
NumPy's error state is a context variable).
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

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

__all__: list[str] = []


def _class_path(cls: type) -> str | None:
    """``module:qualname`` of an importable class (None for one made in the notebook)."""
    module, qualname = getattr(cls, "__module__", None), getattr(cls, "__qualname__", "")
    if not isinstance(module, str) or module == "__main__" or "<locals>" in qualname:
        return None
    return f"{module}:{qualname}"


def _class_of(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise InterpreterRestoreError(f"{path} is not a class here")
    return obj


class _WarningsFilters:
    """``warnings.filterwarnings``/``simplefilter``: the whole filter list, as
    ``[action, message pattern, category "module:qualname", module pattern, lineno]``."""

    name = "warnings_filters"

    def capture(self, shell: Any) -> object:
        filters: list[object] = []
        problems = []
        for action, message, category, module, lineno in list(warnings.filters):
            if not isinstance(category, type):
                problems.append(f"a warnings filter for {category!r}")
                continue
            path = _class_path(category)
            if path is None:
                problems.append(f"a warnings filter for {category!r}, a class of the notebook")
                continue
            filters.append(
                (
                    action,
                    getattr(message, "pattern", message),
                    path,
                    getattr(module, "pattern", module),
                    lineno,
                )
            )
        return Lossy(filters, tuple(problems)) if problems else filters

    def restore(self, shell: Any, value: object) -> None:
        entries = _expect(value, list, "a list of warnings filters")
        rebuilt = []
        for entry in entries:
            action, message, category, module, lineno = _expect(entry, tuple, "a filter")
            rebuilt.append(
                (
                    action,
                    re.compile(message, re.I) if message is not None else None,
                    _class_of(category),
                    re.compile(module) if module is not None else None,
                    lineno,
                )
            )
        filters: list[Any] = warnings.filters  # type: ignore[assignment]  # a list in fact
        filters[:] = rebuilt
        warnings._filters_mutated()  # type: ignore[attr-defined]  # invalidates the cache


class _NumpyErrState:
    """``np.seterr``: what NumPy does on divide, overflow, underflow, invalid."""

    name = "numpy_errstate"

    def capture(self, shell: Any) -> object:
        np = _loaded("numpy")
        if np is None:
            return NOT_APPLICABLE
        return dict(sorted(np.geterr().items()))

    def restore(self, shell: Any, value: object) -> None:
        settings = _expect(value, dict, "a dict of NumPy error settings")
        _importing("numpy").seterr(**settings)


def _pandas_option(config: Any, key: str) -> Any:
    """The current value of a pandas option, read from pandas' own nested dict (what
    ``pd.get_option`` reads, at a fraction of its cost: this runs after every cell)."""
    node = config._global_config
    *path, leaf = key.split(".")
    for part in path:
        node = node[part]
    return node[leaf]


class _PandasOptions:
    """``pd.set_option``: the options that differ from their defaults."""

    name = "pandas_options"

    def capture(self, shell: Any) -> object:
        if _loaded("pandas") is None:
            return NOT_APPLICABLE
        config = _loaded("pandas._config.config")
        if config is None:
            return NOT_APPLICABLE
        changed: dict[str, object] = {}
        problems = []
        for key, option in list(config._registered_options.items()):
            try:
                current = _pandas_option(config, key)
            except (KeyError, TypeError):
                continue
            if current is option.defval or current == option.defval:
                continue
            ok, plain = _plain(current)
            if ok:
                changed[key] = plain
            else:
                problems.append(f"pandas option {key}={_show(current)} is not plain data")
        return Lossy(changed, tuple(problems)) if problems else changed

    def restore(self, shell: Any, value: object) -> None:
        wanted = _expect(value, dict, "a dict of pandas options")
        pandas = _importing("pandas")
        config = importlib.import_module("pandas._config.config")
        for key, option in list(config._registered_options.items()):
            target = wanted.get(key, option.defval)
            try:
                if _pandas_option(config, key) != target:
                    pandas.set_option(key, target)
            except Exception as exc:
                raise InterpreterRestoreError(f"pandas option {key}: {exc}") from None


class _TracebackMode:
    """``%xmode``: how IPython shows tracebacks (Plain, Context, Verbose, Minimal)."""

    name = "ipython_xmode"

    def capture(self, shell: Any) -> object:
        tb = getattr(shell, "InteractiveTB", None)
        mode = getattr(tb, "mode", None)
        return mode if isinstance(mode, str) else NOT_APPLICABLE

    def restore(self, shell: Any, value: object) -> None:
        mode = _expect(value, str, "a traceback mode")
        tb = getattr(shell, "InteractiveTB", None)
        if tb is None:
            raise InterpreterRestoreError("no IPython shell here to set %xmode on")
        if tb.mode != mode:
            tb.set_mode(mode=mode)


class _Matplotlib:
    """matplotlib's backend (``matplotlib.use``) and the ``rcParams`` that differ from the
    defaults (``plt.rcParams[...] = ...``, ``plt.style.use``)."""

    name = "matplotlib"

    def capture(self, shell: Any) -> object:
        matplotlib = _loaded("matplotlib")
        if matplotlib is None:
            return NOT_APPLICABLE
        params = matplotlib.rcParams
        defaults = matplotlib.rcParamsDefault
        changed: dict[str, object] = {}
        problems = []
        for key, value in dict.items(params):
            if key == "backend" or value == dict.get(defaults, key):
                continue
            ok, plain = _plain(value)
            if ok:
                changed[key] = plain
            else:
                problems.append(f"matplotlib rcParams[{key!r}] = {_show(value)} is not plain data")
        backend = params._get_backend_or_none() if hasattr(params, "_get_backend_or_none") else None
        state = {"backend": backend, "rc": changed}
        return Lossy(state, tuple(problems)) if problems else state

    def restore(self, shell: Any, value: object) -> None:
        state = _expect(value, dict, "matplotlib's settings")
        matplotlib = _importing("matplotlib")
        wanted = _expect(state.get("rc", {}), dict, "rcParams")
        params = matplotlib.rcParams
        defaults = matplotlib.rcParamsDefault
        for key in set(wanted) | {k for k, v in dict.items(params) if v != dict.get(defaults, k)}:
            if key == "backend":
                continue
            target = wanted.get(key, dict.get(defaults, key))
            if dict.get(params, key) != target:
                try:
                    params[key] = target
                except (KeyError, ValueError) as exc:
                    raise InterpreterRestoreError(f"matplotlib rcParams[{key!r}]: {exc}") from None
        backend = state.get("backend")
        if isinstance(backend, str):
            current = (
                params._get_backend_or_none() if hasattr(params, "_get_backend_or_none") else None
            )
            if current != backend:
                matplotlib.use(backend)
