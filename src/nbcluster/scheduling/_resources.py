"""Resource quantities and the parsing of a kernel's resource request.

The gateway calls :func:`parse_request` on the env of ``POST /api/kernels`` (Enterprise
Gateway names) before it hands a ``KernelRequested`` event to the scheduler; host specs are
built by the gateway from what each host reports. Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_REQUEST", "Resources", "parse_request"]


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each resource: a host's spec, a kernel's request or a sum of claims."""

    gpus: int = 0
    millicpus: int = 0
    memory_mb: int = 0
    vram_gb: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.gpus + other.gpus,
            self.millicpus + other.millicpus,
            self.memory_mb + other.memory_mb,
            self.vram_gb + other.vram_gb,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.gpus - other.gpus,
            self.millicpus - other.millicpus,
            self.memory_mb - other.memory_mb,
            # Float sums drift; snap tiny residues so that claims added then removed cancel.
            _snap(self.vram_gb - other.vram_gb),
        )

    def fits(self, capacity: Resources) -> bool:
        """Whether every field of ``self`` is at most the same field of ``capacity``."""
        return (
            self.gpus <= capacity.gpus
            and self.millicpus <= capacity.millicpus
            and self.memory_mb <= capacity.memory_mb
            and self.vram_gb <= capacity.vram_gb + 1e-9
        )

    def is_zero(self) -> bool:
        return self.gpus == 0 and self.millicpus == 0 and self.memory_mb == 0 and self.vram_gb == 0

    def fields(self) -> dict[str, float]:
        """Field name → value, in declaration order (used for ratio checks and messages)."""
        return {
            "gpus": self.gpus,
            "millicpus": self.millicpus,
            "memory_mb": self.memory_mb,
            "vram_gb": self.vram_gb,
        }


def _snap(value: float) -> float:
    return 0.0 if abs(value) < 1e-9 else value


#: What a kernel asks for when its env names nothing: one core, 1 GiB, no GPU.
DEFAULT_REQUEST = Resources(gpus=0, millicpus=1000, memory_mb=1024, vram_gb=0.0)


def parse_request(env: Mapping[str, str], default: Resources = DEFAULT_REQUEST) -> Resources:
    """The request carried by ``KERNEL_GPUS`` (int), ``KERNEL_CPUS`` (cores, float),
    ``KERNEL_MEMORY_MB`` and ``KERNEL_VRAM_GB`` (floats); absent fields take ``default``.

    Raises ``ValueError`` naming the env variable for a non-numeric, non-finite or negative
    value (the gateway turns it into a 400).
    """
    gpus = default.gpus
    millicpus = default.millicpus
    memory_mb = default.memory_mb
    vram_gb = default.vram_gb
    if "KERNEL_GPUS" in env:
        raw = env["KERNEL_GPUS"].strip()
        try:
            gpus = int(raw)
        except ValueError:
            raise ValueError(f"KERNEL_GPUS must be a whole number, got {raw!r}") from None
        if gpus < 0:
            raise ValueError(f"KERNEL_GPUS must not be negative, got {gpus}")
    if "KERNEL_CPUS" in env:
        millicpus = math.ceil(_number(env, "KERNEL_CPUS") * 1000)
    if "KERNEL_MEMORY_MB" in env:
        memory_mb = math.ceil(_number(env, "KERNEL_MEMORY_MB"))
    if "KERNEL_VRAM_GB" in env:
        vram_gb = _number(env, "KERNEL_VRAM_GB")
    return Resources(gpus, millicpus, memory_mb, vram_gb)


def _number(env: Mapping[str, str], name: str) -> float:
    raw = env[name].strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {raw!r}")
    return value
