"""The probes of display state: NumPy's print options, IPython's ``%precision`` and the
settings ``%config`` made.

Each class here is one :class:`~nbcluster.kernel._interpreter_base.InterpreterProbe`; nothing
calls them directly: :data:`nbcluster.kernel._interpreter.DEFAULT_PROBES` holds one instance of
each (in the order ``%config``, ``%precision``, NumPy print options, because each can set the
next one's state), and :func:`~nbcluster.kernel._interpreter.capture_all` calls their
``capture`` on the executor after every cell, :func:`~nbcluster.kernel._interpreter.restore_all`
their ``restore`` on the other replicas when they apply a cell's state update. The probes of
the Python runtime's own state are in :mod:`nbcluster.kernel._interpreter_probes`.
"""

from __future__ import annotations

from typing import Any, Final

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

# ---------------------------------------------------------------------------------------------
# NumPy print options

_NUMPY_FUNCTION_OPTIONS: Final = ("formatter", "override_repr")


class _NumpyPrintOptions:
    """``np.set_printoptions``: a dict of the data options. A formatter function (or
    ``override_repr``) is code, not data: it is left out and named as lost; when unset it is
    carried as ``None``, which clears one a follower may still hold."""

    name = "numpy_printoptions"

    def capture(self, shell: Any) -> object:
        np = _loaded("numpy")
        if np is None:
            return NOT_APPLICABLE
        options: dict[str, object] = {}
        problems = []
        for key, option in np.get_printoptions().items():
            ok, plain = _plain(option.item() if isinstance(option, np.generic) else option)
            if ok:
                options[key] = plain
            elif key in _NUMPY_FUNCTION_OPTIONS:
                problems.append(f"np.set_printoptions({key}=...) is code and stays on this replica")
            else:
                problems.append(f"NumPy print option {key}={_show(option)} is not plain data")
        return Lossy(options, tuple(problems)) if problems else options

    def restore(self, shell: Any, value: object) -> None:
        options = _expect(value, dict, "a dict of NumPy print options")
        np = _importing("numpy")
        known = np.get_printoptions()
        usable = {k: v for k, v in options.items() if k in known}
        if usable:
            np.set_printoptions(**usable)
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise InterpreterRestoreError(
                f"this NumPy ({np.__version__}) has no print options {', '.join(unknown)}"
            )


# ---------------------------------------------------------------------------------------------
# IPython: %precision and %config


def _plain_text_formatter(shell: Any) -> Any:
    formatter = getattr(shell, "display_formatter", None)
    formatters = getattr(formatter, "formatters", None)
    return formatters.get("text/plain") if isinstance(formatters, dict) else None


class _IPythonPrecision:
    """``%precision``: the plain-text formatter's ``float_precision`` (a str: ``''``, ``'3'`` or
    a format such as ``'%.2e'``). Setting it also sets NumPy's print precision, so it is
    restored before ``numpy_printoptions``."""

    name = "ipython_precision"

    def capture(self, shell: Any) -> object:
        formatter = _plain_text_formatter(shell)
        if formatter is None:
            return NOT_APPLICABLE
        return str(formatter.float_precision)

    def restore(self, shell: Any, value: object) -> None:
        precision = _expect(value, str, "a str")
        formatter = _plain_text_formatter(shell)
        if formatter is None:
            raise InterpreterRestoreError("no IPython shell here to set %precision on")
        if formatter.float_precision != precision:
            formatter.float_precision = precision


# Sections of the configuration of the kernel process itself (its application, kernel, session,
# profile directory): set at start, per process (the connection file), and out of %config's
# reach (it applies to the shell's configurables only).
_PRIVATE_SECTIONS: Final = frozenset(
    {
        "Application",
        "BaseIPythonApplication",
        "ConnectionFileMixin",
        "InteractiveShellApp",
        "IPKernelApp",
        "IPythonKernel",
        "Kernel",
        "KernelApp",
        "ProfileDir",
        "Session",
    }
)


def _private_sections(shell: Any) -> frozenset[str]:
    """:data:`_PRIVATE_SECTIONS` plus the class names of the shell's parents (kernel, app),
    except those the shell itself is an instance of (``LoggingConfigurable`` ...)."""
    own = {cls.__name__ for cls in type(shell).__mro__}
    names = set(_PRIVATE_SECTIONS)
    parent = getattr(shell, "parent", None)
    for _ in range(8):  # parent chains are short; a cycle must not hang a cell
        if parent is None:
            break
        names.update(cls.__name__ for cls in type(parent).__mro__)
        parent = getattr(parent, "parent", None)
    return frozenset(names - own)


def _config_sections(shell: Any, problems: list[str] | None) -> dict[str, dict[str, object]]:
    """The shell's configuration as plain data, minus private sections and empty ones."""
    config = getattr(shell, "config", None)
    if not isinstance(config, dict):
        return {}
    private = _private_sections(shell)
    sections: dict[str, dict[str, object]] = {}
    for section, traits in config.items():
        if section in private or not isinstance(traits, dict) or not traits:
            continue
        plain_traits = {}
        for trait, setting in traits.items():
            ok, plain = _plain(setting)
            if ok:
                plain_traits[str(trait)] = plain
            elif problems is not None:
                problems.append(
                    f"%config {section}.{trait} = {_show(setting)} is not plain data "
                    "and stays on this replica"
                )
        if plain_traits:
            sections[str(section)] = plain_traits
    return sections


class _IPythonConfig:
    """What ``%config Class.trait = value`` set: IPython's ``%config`` merges a ``Config`` into
    every configurable's config (the shell's included, so ``shell.config`` records it); this
    probe carries ``shell.config``'s sections as ``{class: {trait: value}}``, and restores by
    applying what differs the way the magic does, so configurables created later (such as
    matplotlib's ``InlineBackend``) find it too. A setting is never removed (``%config``
    cannot remove one either)."""

    name = "ipython_config"

    def capture(self, shell: Any) -> object:
        if shell is None or not hasattr(shell, "configurables"):
            return NOT_APPLICABLE
        problems: list[str] = []
        sections = _config_sections(shell, problems)
        return Lossy(sections, tuple(problems)) if problems else sections

    def restore(self, shell: Any, value: object) -> None:
        from traitlets.config.loader import Config

        wanted = _expect(value, dict, "a dict of config sections")
        if shell is None or not hasattr(shell, "configurables"):
            raise InterpreterRestoreError("no IPython shell here to apply %config to")
        current = _config_sections(shell, None)
        private = _private_sections(shell)
        differences: dict[str, dict[str, object]] = {}
        for section, traits in wanted.items():
            _expect(traits, dict, f"a dict of traits for {section}")
            if not isinstance(section, str) or section in private:
                continue
            have = current.get(section, {})
            for trait, setting in traits.items():
                if trait not in have or have[trait] != setting:
                    differences.setdefault(section, {})[trait] = setting
        if not differences:
            return
        delta = Config(differences)
        configurables = [c for c in shell.configurables if c.__class__.class_traits(config=True)]
        if shell not in configurables:
            configurables.append(shell)
        failures = []
        for configurable in configurables:
            try:
                configurable.update_config(delta)
            except Exception as exc:  # a bad value for one class must not stop the others
                failures.append(f"{type(configurable).__name__}: {exc}")
        if failures:
            raise InterpreterRestoreError("%config: " + "; ".join(failures))
