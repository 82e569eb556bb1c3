"""Module state a notebook changes: attributes it assigns on imported modules (``json.flag =
1``, ``pandas.DataFrame.nice = f``), and the user's own modules (a ``%%writefile mymod.py``
then ``import mymod``): their source files and their module-level state.

Used by :class:`~._sync.StateSynchronizer`, which treats each such attribute as a slot
``@module:attribute.path`` like any user global (so identities with other names hold), and
ships user modules' files before anything that may import them is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

from ._payload import FileEntry, module_slot

__all__ = ["ModuleSlots", "user_module_path"]

log = logging.getLogger(__name__)

_MISSING: Any = object()


@functools.cache
def _install_dirs() -> tuple[Path, ...]:
    dirs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return tuple(dirs)


def user_module_path(module: types.ModuleType) -> str | None:
    """The path (relative to the working directory) of a module the user wrote there, None
    for installed and standard modules."""
    filename = getattr(module, "__file__", None)
    if not isinstance(filename, str) or not filename.endswith(".py"):
        return None
    # Cheap string checks first: most modules are installed ones (numpy imports hundreds).
    if "site-packages" in filename or "dist-packages" in filename:
        return None
    try:
        cwd = Path(os.getcwd()).resolve()
        path = Path(filename).resolve()
        relative = path.relative_to(cwd)
    except (ValueError, OSError):
        return None
    # Found through the working directory itself (``import mymod``, ``from utils import h``),
    # not through an installed or editable package that happens to live below it.
    top = module.__name__.split(".")[0]
    if (cwd / top).resolve() not in (path.with_suffix(""), *path.parents):
        return None
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return None
    if any(path.is_relative_to(d) for d in _install_dirs()):
        return None
    return relative.as_posix()


def _resolve(module_name: str, path: tuple[str, ...]) -> Any:
    obj: Any = sys.modules.get(module_name, _MISSING)
    for name in path:
        if obj is _MISSING:
            return _MISSING
        obj = getattr(obj, name, _MISSING)
    return obj


def _importable_owner(value: Any) -> tuple[str, tuple[str, ...]] | None:
    """(module, qualified path) for a module, or a class/function importable by name."""
    if isinstance(value, types.ModuleType):
        if getattr(value, "__spec__", None) is None and getattr(value, "__file__", None) is None:
            return None  # made in the notebook: it travels by value, attributes and all
        return value.__name__, ()
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or module == "__main__" or not isinstance(qualname, str):
        return None
    path = tuple(qualname.split("."))
    if "<locals>" in path or _resolve(module, path) is not value:
        return None
    return module, path


class ModuleSlots:
    """The ``@module:attr`` slots of one replica, and its user modules' files."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.slots: set[str] = set()
        #: user module name -> its file's relative path
        self.user_modules: dict[str, str] = {}
        #: relative path -> digest of the contents last shipped or written
        self._files: dict[str, str] = {}
        # Modules loaded before the notebook's first cell are the kernel's, not the user's.
        self._preloaded = set(sys.modules)
        self._modules_seen = len(sys.modules)

    # -- executor side ----------------------------------------------------------------------

    def note_stores(self, stores: Iterable[tuple[str, tuple[str, ...]]]) -> set[str]:
        """Slots for ``root.a.b = ...`` where ``root`` is a module or an importable class."""
        new: set[str] = set()
        for root, path in stores:
            value = self.namespace.get(root, _MISSING)
            if value is _MISSING:
                continue
            owner = _importable_owner(value)
            if owner is None:
                continue
            module, prefix = owner
            slot = f"@{module}:{'.'.join((*prefix, *path))}"
            if module_slot(slot) is not None:
                self.slots.add(slot)
                new.add(slot)
        return new

    def _discover_user_modules(self) -> None:
        if len(sys.modules) == self._modules_seen:
            return
        self._modules_seen = len(sys.modules)
        for name, module in list(sys.modules.items()):
            if (
                name in self.user_modules
                or name in self._preloaded
                or not isinstance(module, types.ModuleType)
            ):
                continue
            path = user_module_path(module)
            if path is not None:
                self.user_modules[name] = path

    def _state_slots(self, name: str) -> set[str]:
        """A user module's module-level data (not what its source defines)."""
        module = sys.modules.get(name)
        if module is None:
            return set()
        slots = set()
        for attr, value in list(vars(module).items()):
            if attr.startswith("__") or _importable_owner(value) is not None:
                continue  # modules, functions and classes: the source or an import carry them
            slot = f"@{name}:{attr}"
            if module_slot(slot) is not None:
                slots.add(slot)
        return slots

    def read(self) -> dict[str, object]:
        """slot -> current value, for every module slot that exists now."""
        self._discover_user_modules()
        for name in self.user_modules:
            self.slots |= self._state_slots(name)
        values: dict[str, object] = {}
        for slot in list(self.slots):
            parsed = module_slot(slot)
            if parsed is None:
                continue
            value = _resolve(*parsed)
            if value is _MISSING:
                if parsed[0] in sys.modules:
                    self.slots.discard(slot)  # deleted: the caller ships the deletion
                continue
            values[slot] = value
        return values

    def touched_by(self, dirty: Iterable[str], current: Mapping[str, object]) -> set[str]:
        """The state slots of user modules that a touched slot holds (a call such as
        ``mymod.register(x)`` may change that module's data)."""
        touched: set[str] = set()
        for slot in dirty:
            value = current.get(slot)
            if isinstance(value, types.ModuleType) and value.__name__ in self.user_modules:
                touched |= {s for s in current if s.startswith(f"@{value.__name__}:")}
        return touched

    def changed_files(self) -> list[FileEntry]:
        """User modules' files that are new or changed since the last call."""
        files: list[FileEntry] = []
        for path in sorted(set(self.user_modules.values())):
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            digest = str(xxhash.xxh3_128_hexdigest(data))
            if self._files.get(path) != digest:
                self._files[path] = digest
                files.append({"path": path, "h": digest, "v": data})
        return files

    # -- follower side ----------------------------------------------------------------------

    def write_files(self, files: Iterable[FileEntry]) -> None:
        """Write user modules' files under the working directory, where the executor had them
        (the working directory itself follows the executor: ``_interpreter``)."""
        wrote = False
        for file in files:
            path = Path(file["path"])
            self._files[file["path"]] = file["h"]
            try:
                if path.is_file() and xxhash.xxh3_128_hexdigest(path.read_bytes()) == file["h"]:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(file["v"])
                wrote = True
            except OSError as exc:
                log.warning("cannot write the user module file %s: %s", path, exc)
        if wrote:
            importlib.invalidate_caches()

    def assign(self, slot: str, value: object) -> None:
        parsed = module_slot(slot)
        if parsed is None:
            raise ValueError(f"not a module slot: {slot!r}")
        module_name, path = parsed
        if module_name not in sys.modules:
            importlib.import_module(module_name)
        owner = _resolve(module_name, path[:-1])
        if owner is _MISSING:
            raise AttributeError(f"{module_name}.{'.'.join(path[:-1])} does not exist here")
        setattr(owner, path[-1], value)
        self.slots.add(slot)

    def remove(self, slot: str) -> bool:
        parsed = module_slot(slot)
        self.slots.discard(slot)
        if parsed is None:
            return False
        owner = _resolve(parsed[0], parsed[1][:-1])
        if owner is _MISSING or not hasattr(owner, parsed[1][-1]):
            return False
        with contextlib.suppress(AttributeError, TypeError):
            delattr(owner, parsed[1][-1])
            return True
        return False
