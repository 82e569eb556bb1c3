"""The GPUs the gateway bound to one cell, applied while that cell runs.

The gateway binds GPU devices to a replica only while it executes a cell and says which in the
``execute_request``'s metadata: ``metadata["nbcluster"]["gpus"] = [0, 2]`` (physical device
indices; ``[]``: no GPU; key absent: the gateway says nothing and nothing changes).
:func:`cell_gpus` reads and checks that value and, for the duration of the cell's run, sets

* ``CUDA_VISIBLE_DEVICES`` in ``os.environ`` to ``"0,2"`` (``""``: CUDA sees no device), so
  processes the cell starts (``subprocess``, ``os.system``, ``!cmd``) see exactly those devices;
* ``NBCLUSTER_GPUS`` likewise, so :func:`nbcluster.runtime.gpus` in such a process agrees;
* :mod:`nbcluster.runtime`'s cell binding, which :func:`nbcluster.runtime.gpus` returns.

Afterwards (also when the cell raises) each is restored to what it was before the cell. An
environment variable that the cell itself set to another value is left as the cell set it: that
is the user's choice for the cells that follow.

The indices are NVML's (the host daemon discovers its GPUs through NVML: in practice PCI bus
order, as ``nvidia-smi`` shows them), while CUDA by default numbers devices fastest first, which can differ on a
host with mixed GPU models; :func:`use_nvml_device_order` makes CUDA use the PCI bus order too.

``CUDA_VISIBLE_DEVICES`` does not restrict the kernel process itself: the kernel initialises
the CUDA driver at start with every device visible and, before each cell, makes the bound
device current in the GPU frameworks (``_cuda``); the namespace's GPU memory follows the
binding (``_device_memory``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .. import envvars, runtime
from ..protocol import METADATA_KEY, check_gpus, cpu_magic_line

__all__ = [
    "CUDA_ENV",
    "DEVICE_ORDER_ENV",
    "bound_gpus",
    "cell_gpus",
    "parse_cell_gpus",
    "strip_cpu_magic",
    "use_nvml_device_order",
]

CUDA_ENV = envvars.CUDA_VISIBLE_DEVICES.name
DEVICE_ORDER_ENV = envvars.CUDA_DEVICE_ORDER.name


def use_nvml_device_order() -> None:
    """Make CUDA number devices by PCI bus id, as NVML and so the gateway's indices do.

    Called once when the kernel starts, before any cell can initialise CUDA; a value already in
    the environment (the operator's) is kept.
    """
    os.environ.setdefault(DEVICE_ORDER_ENV, "PCI_BUS_ID")


def parse_cell_gpus(metadata: Any) -> tuple[tuple[int, ...] | None, str | None]:
    """Read ``nbcluster.gpus`` from an ``execute_request``'s metadata.

    Returns ``(devices, None)`` for a valid list, ``(None, None)`` when the metadata carries no
    ``gpus`` (no binding to apply), and ``(None, problem)`` for a value that is not a list of
    distinct non-negative ints, ``problem`` saying what is wrong with it.
    """
    meta = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(meta, dict) or "gpus" not in meta:
        return None, None
    try:
        # The same check as the protocol's ExecuteMetadata.gpus.
        return check_gpus(meta["gpus"]), None
    except ValueError as exc:
        return None, str(exc)


@contextmanager
def bound_gpus(devices: tuple[int, ...]) -> Iterator[None]:
    """Bind ``devices`` to the code run inside the block (see the module's docstring)."""
    value = ",".join(str(d) for d in devices)
    names = (CUDA_ENV, envvars.GPUS.name)
    before = {name: os.environ.get(name) for name in names}
    previous = runtime._set_cell_gpus(devices)
    try:
        for name in names:
            os.environ[name] = value
        yield
    finally:
        runtime._set_cell_gpus(previous)
        for name in names:
            if os.environ.get(name) != value:
                continue  # the cell set it itself: keep its choice
            old = before[name]
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextmanager
def cell_gpus(metadata: Any, warn: Callable[[str], None]) -> Iterator[tuple[int, ...] | None]:
    """Apply the binding in an ``execute_request``'s ``metadata`` for the block's duration.

    Yields the bound devices, or None when none was applied: no ``gpus`` in the metadata, or an
    invalid one, which is reported through ``warn`` (the cell's stderr) and otherwise ignored.
    """
    devices, problem = parse_cell_gpus(metadata)
    if problem is not None:
        warn(
            f"[nbcluster] ignoring the GPU binding sent with this cell (metadata nbcluster.gpus): "
            f"{problem}. {CUDA_ENV} and nbcluster.runtime.gpus() are left as they were.\n"
        )
    if devices is None:
        yield None
        return
    with bound_gpus(devices):
        yield devices


def strip_cpu_magic(lines: list[str]) -> list[str]:
    """An IPython input transformer (``input_transformers_cleanup``): a ``%%cpu`` cell
    (``protocol.cpu_magic_line``; the gateway ran it without GPUs) runs without that line,
    as any other cell (history, outputs, state capture)."""
    index = cpu_magic_line(lines)
    return lines if index is None else lines[:index] + lines[index + 1 :]
