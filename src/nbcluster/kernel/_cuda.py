"""CUDA in the kernel process: every device of the host visible, the bound one current.

The real-CUDA side of per-cell GPU binding; the binding itself (``CUDA_VISIBLE_DEVICES`` for
the processes a cell starts, :func:`nbcluster.runtime.gpus`) is ``_gpus``.

**Why the driver is initialised at start.** The CUDA driver reads ``CUDA_VISIBLE_DEVICES`` (and
``CUDA_DEVICE_ORDER``) once, in the process's first ``cuInit``, and numbers and limits the
process's devices that way for its whole life; later calls of ``cuInit`` (every framework makes
one when it starts using CUDA) change nothing. The replica sets ``CUDA_VISIBLE_DEVICES`` to the
cell's devices while a cell runs, for the cell's child processes; if that cell were the first to
use CUDA in the kernel process, the process would see only that cell's devices for its life,
and a later cell bound to other devices could not reach them. :func:`init_driver` calls
``cuInit(0)`` when the kernel starts, before any cell, with the environment the host daemon
launched it with: under per-cell binding no ``CUDA_VISIBLE_DEVICES`` (every device of the host
visible, CUDA ordinal ``i`` being physical device ``i``, since ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
is set first); under a life-long binding (``reservation``) the kernel's own devices. ``cuInit``
creates no context and allocates no device memory: it loads the driver and enumerates devices.
It does mean that a cell's ``multiprocessing`` children started with ``fork`` cannot use CUDA
(the driver does not survive a fork after ``cuInit``): such children must use ``spawn``, as for
any process that has used CUDA already.

**The bound device current.** Code written for one GPU (``.cuda()``, ``torch.device("cuda")``,
``cupy.asarray``) uses the framework's *current* device. Before each cell with GPUs bound,
:func:`make_current` makes the first bound device current in the frameworks the kernel has
imported: PyTorch (``torch.cuda.set_device``; while torch has not initialised CUDA yet, at its
initialisation, through torch's queue of calls run then, so that no context is created for a
cell that does not use the GPU); CuPy (``cupy.cuda.Device(i).use()``). A framework imported by
the cell itself is caught by an import hook (:func:`install_import_hook`). JAX is not followed:
it picks its devices when its backend starts and allocates on all of them (see "GPUs inside a
cell" in ``docs/architecture.md``).
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .. import envvars, runtime

__all__ = [
    "DeviceNumbering",
    "init_driver",
    "install_import_hook",
    "make_current",
    "numbering",
]

log = logging.getLogger(__name__)

_LIBCUDA = "libcuda.so.1"


@dataclass(frozen=True)
class DeviceNumbering:
    """How this process's CUDA ordinals map to the host's physical (NVML) device indices, as
    fixed by the ``CUDA_VISIBLE_DEVICES`` the driver was initialised with."""

    #: The physical index of each ordinal; None: every device, ordinal ``i`` is physical ``i``.
    visible: tuple[int, ...] | None = None
    #: False when ``CUDA_VISIBLE_DEVICES`` named devices otherwise (UUIDs, MIG instances):
    #: nothing is mapped then.
    known: bool = True

    @classmethod
    def from_environment(cls, value: str | None) -> DeviceNumbering:
        if value is None:
            return cls()
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
        if all(p.isascii() and p.isdigit() for p in parts):
            return cls(visible=tuple(int(p) for p in parts))
        return cls(visible=(), known=False)

    def ordinal(self, physical: int) -> int | None:
        """The CUDA ordinal of ``physical`` in this process; None when it cannot see it."""
        if not self.known:
            return None
        if self.visible is None:
            return physical
        try:
            return self.visible.index(physical)
        except ValueError:
            return None

    def physical(self, ordinal: int) -> int | None:
        """The physical index of this process's CUDA ordinal ``ordinal``; None if unknown."""
        if not self.known or ordinal < 0:
            return None
        if self.visible is None:
            return ordinal
        return self.visible[ordinal] if ordinal < len(self.visible) else None


_numbering = DeviceNumbering()


def numbering() -> DeviceNumbering:
    """This process's numbering (set by :func:`init_driver`; every device before)."""
    return _numbering


def _load_libcuda() -> Any | None:
    try:
        return ctypes.CDLL(_LIBCUDA)
    except OSError:
        return None  # no NVIDIA driver on this host: there is no CUDA to initialise


def init_driver(load: Callable[[], Any | None] = _load_libcuda) -> bool:
    """Initialise the CUDA driver now (``cuInit(0)``) with the environment as it is, and
    record the device numbering it fixes; True when the driver is there and initialised.
    Called once when the kernel starts, after ``use_nvml_device_order`` (see the module's
    docstring)."""
    global _numbering
    _numbering = DeviceNumbering.from_environment(os.environ.get(envvars.CUDA_VISIBLE_DEVICES.name))
    lib = load()
    if lib is None:
        return False
    try:
        result = int(lib.cuInit(0))
    except Exception:  # a broken driver library: the frameworks will say so themselves
        log.exception("cuInit failed")
        return False
    if result != 0:
        # 100 (CUDA_ERROR_NO_DEVICE) on a host whose driver sees no GPU: nothing to use.
        log.info("cuInit(0) returned %d: CUDA is not usable in this kernel", result)
        return False
    return True


# -- the current device ------------------------------------------------------------------------


def _bound_ordinal() -> int | None:
    """The CUDA ordinal of the first device bound to the running cell, if there is one."""
    devices = runtime.gpus()
    return _numbering.ordinal(devices[0]) if devices else None


def _torch_at_init() -> None:
    """Run by torch when it initialises CUDA (its queued calls): the bound device current.
    Never raises: an exception here would make torch's CUDA initialisation fail."""
    try:
        ordinal = _bound_ordinal()
        torch = sys.modules.get("torch")
        if ordinal is not None and torch is not None:
            torch.cuda.set_device(ordinal)
    except Exception:
        log.exception("could not make the bound GPU current in torch")


_torch_queued: set[int] = set()  # ids of torch.cuda modules our call is queued in
_lock = threading.Lock()


def _select_torch(cuda: ModuleType, ordinal: int | None) -> None:
    if cuda.is_initialized():
        if ordinal is not None:
            cuda.set_device(ordinal)
        return
    with _lock:
        if id(cuda) in _torch_queued:
            return
        _torch_queued.add(id(cuda))
    # Runs once, when torch initialises CUDA, with the binding of that moment.
    queue = getattr(cuda, "_lazy_call", None)
    if queue is not None:
        queue(_torch_at_init)


def _select_cupy(cupy: ModuleType, ordinal: int | None) -> None:
    if ordinal is not None:
        cupy.cuda.Device(ordinal).use()


_SELECTORS: dict[str, Callable[[ModuleType, int | None], None]] = {
    "torch.cuda": _select_torch,
    "cupy": _select_cupy,
}


def make_current(devices: Sequence[int]) -> list[str]:
    """Make ``devices[0]`` (physical) current in each GPU framework the kernel has imported;
    before a cell with ``devices`` bound. Returns what could not be done (for the cell's
    stderr); nothing when the binding is empty or the device is not visible to this process
    (a life-long binding that does not include it, a ``CUDA_VISIBLE_DEVICES`` of UUIDs)."""
    ordinal = _numbering.ordinal(devices[0]) if devices else None
    problems = []
    for name, select in _SELECTORS.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        try:
            select(module, ordinal)
        except Exception as exc:
            problems.append(f"could not make GPU {devices[0]} current in {name}: {exc}")
    return problems


# -- frameworks imported by a cell -------------------------------------------------------------


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``_SELECTORS[name]`` right after the module ``name`` has been executed (imported
    for the first time), with the binding of that moment."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        select = _SELECTORS.get(fullname)
        if select is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return None
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            try:
                select(module, _bound_ordinal())
            except Exception:
                log.exception("could not make the bound GPU current in %s", fullname)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_hook = _AfterImport()


def install_import_hook() -> None:
    """Catch torch and CuPy when a cell imports them (once per process)."""
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
