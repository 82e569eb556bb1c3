"""What code running in an nbcluster kernel can ask about where it runs.

Who calls what:

* **Notebook code** (a cell, or a library it calls) calls :func:`gpus` to learn which GPU
  devices are bound to the cell that is executing, and :func:`in_nbcluster` to learn whether it
  runs in (or was started from) an nbcluster kernel replica.
* **The replica kernel** (:class:`nbcluster.kernel.ReplicaKernel`, through
  ``nbcluster.kernel._gpus``) calls :func:`_set_cell_gpus` with the devices the gateway bound to
  a cell (``metadata["nbcluster"]["gpus"]`` of its ``execute_request``) before the cell runs, and
  again with the previous value when it ends. It calls :func:`_mark_kernel` once at start-up.
* **The gateway**, for a kernel that holds GPUs for its whole life (policy ``reservation``), sets
  ``NBCLUSTER_GPUS="0,2"`` (and ``CUDA_VISIBLE_DEVICES`` to the same list) in the replica's
  environment at launch; :func:`gpus` falls back to that variable when no cell binding is set.

The indices are the host's physical (NVML) device indices, not CUDA ordinals of this process:
see "GPUs inside a cell" in ``docs/architecture.md`` for how to turn them into devices.
"""

from __future__ import annotations

import os
import warnings

from . import envvars

__all__ = ["gpus", "in_nbcluster"]

#: The environment variable holding a life-long binding ("0,2"; "" for none).
_GPUS_ENV = envvars.GPUS.name

# The binding of the executing cell; None: the kernel set none, use the environment.
_cell_gpus: tuple[int, ...] | None = None
# Whether a replica kernel runs in this process.
_kernel_running = False


def gpus() -> tuple[int, ...]:
    """The GPU device indices bound to the currently executing cell, ``()`` if none.

    Inside a replica kernel these are the devices the gateway bound to the running cell, or,
    when it bound none per cell, the kernel's life-long devices from ``NBCLUSTER_GPUS``. In a
    process a cell started (which inherits the environment) the same ``NBCLUSTER_GPUS`` is
    read. Outside nbcluster the result is ``()``.
    """
    if _cell_gpus is not None:
        return _cell_gpus
    return _parse_env(os.environ.get(_GPUS_ENV))


def in_nbcluster() -> bool:
    """Whether this code runs in an nbcluster kernel replica, or in a process one started."""
    return _kernel_running or bool(envvars.KERNEL_ID.get())


def _parse_env(value: str | None) -> tuple[int, ...]:
    if value is None or not value.strip():
        return ()
    try:
        devices = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        devices = (-1,)
    if any(d < 0 for d in devices):
        warnings.warn(
            f"{_GPUS_ENV}={value!r} is not a comma-separated list of GPU indices; ignoring it",
            RuntimeWarning,
            stacklevel=3,
        )
        return ()
    return devices


def _set_cell_gpus(devices: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Set the executing cell's binding (None: none, fall back to the environment).

    Called by the replica kernel only; returns the previous value so that it can restore it.
    """
    global _cell_gpus
    previous = _cell_gpus
    _cell_gpus = None if devices is None else tuple(devices)
    return previous


def _mark_kernel() -> None:
    """Record that a replica kernel runs in this process (called by the kernel at start-up)."""
    global _kernel_running
    _kernel_running = True
