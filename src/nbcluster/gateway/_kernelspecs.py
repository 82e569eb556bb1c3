"""The kernelspecs the gateway offers: the built-in ``python3`` plus operator-supplied ones.

An operator adds kernelspecs as directories holding a ``kernel.json`` (the Jupyter layout)
under a ``--kernelspec-dir``. A spec that fails validation is skipped with an error naming the
file and the problem; the gateway keeps serving the others.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..hostproto import IMAGE_REFERENCE, check_pool
from ._errors import KernelSpecError
from ._ssh_command import parse_machines

__all__ = ["DEFAULT_KERNEL_NAME", "KernelSpec", "KernelSpecError", "KernelSpecRegistry"]

log = logging.getLogger(__name__)

DEFAULT_KERNEL_NAME = "python3"
_RESOURCE_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg", "kernel.js", "kernel.css")


class KernelSpec(BaseModel):
    """A kernel.json, validated."""

    model_config = ConfigDict(extra="allow")

    argv: list[str] = Field(min_length=1)
    display_name: str = Field(min_length=1)
    language: str = Field(min_length=1)
    interrupt_mode: Literal["signal", "message"] = "signal"
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("argv")
    @classmethod
    def _needs_connection_file(cls, argv: list[str]) -> list[str]:
        if not any("{connection_file}" in a for a in argv):
            raise ValueError("argv must contain '{connection_file}'")
        return argv

    @field_validator("metadata")
    @classmethod
    def _image_is_a_reference(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        image = _image_of(metadata)
        if image is not None and not re.fullmatch(IMAGE_REFERENCE, image):
            raise ValueError(f"image {image!r} is not a container image reference")
        _pool_of(metadata)  # a bad pool name raises
        _remote_hosts_of(metadata)  # so does a bad machine
        _resources_of(metadata)
        _allowed_env_of(metadata)
        _launch_timeout_of(metadata)
        return metadata

    @property
    def image(self) -> str | None:
        """The container image its replicas run in, or None (processes on the host).

        Named as Gateway Provisioners do (``metadata.kernel_provisioner.config.image_name``) or
        as ``metadata.nbcluster.image``; the first wins.
        """
        return _image_of(self.metadata)

    @property
    def pool(self) -> str | None:
        """The host pool its replicas run in, or None (any host).

        Named as ``metadata.nbcluster.pool`` or, as Gateway Provisioners' configuration,
        ``metadata.kernel_provisioner.config.host_pool``; the first wins.
        """
        return _pool_of(self.metadata)

    @property
    def remote_hosts(self) -> tuple[str, ...]:
        """The ssh machines its replicas run on (``[USER@]HOST[:PORT][/ADDRESS]`` each, as
        ``--ssh-hosts``), or () for any host.

        Named as Gateway Provisioners' ``DistributedProvisioner`` does
        (``metadata.kernel_provisioner.config.remote_hosts``) or as
        ``metadata.nbcluster.remote_hosts``; the first wins. The gateway's ssh host provider
        starts daemons on them when this kernelspec's kernels need them
        (``docs/ssh-hosts.md``, "Per-kernelspec machines").
        """
        return _remote_hosts_of(self.metadata)

    @property
    def default_resources(self) -> dict[str, str]:
        """``KERNEL_*`` resource variables its kernels get when the client sets none
        (``metadata.nbcluster.resources``: ``gpus``, ``cpus``, ``memory_mb``, ``vram_gb``)."""
        return _resources_of(self.metadata)

    @property
    def allowed_env(self) -> tuple[str, ...]:
        """Variables beyond ``KERNEL_*`` a client may set for its kernels
        (``metadata.nbcluster.allowed_env``: names, or prefixes ending in ``*``)."""
        return _allowed_env_of(self.metadata)

    @property
    def launch_timeout(self) -> float | None:
        """Seconds a start of its kernels may take (``metadata.nbcluster.launch_timeout`` or
        ``kernel_provisioner.config.launch_timeout``); None: the gateway's
        ``--launch-timeout``."""
        return _launch_timeout_of(self.metadata)


#: ``metadata.nbcluster.resources`` key -> the variable it defaults.
_RESOURCE_KEYS = {
    "gpus": "KERNEL_GPUS",
    "cpus": "KERNEL_CPUS",
    "memory_mb": "KERNEL_MEMORY_MB",
    "vram_gb": "KERNEL_VRAM_GB",
}
#: An ``allowed_env`` entry: a variable name, or a prefix of one followed by ``*``.
_ENV_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


def _stanza(metadata: dict[str, Any]) -> dict[str, Any]:
    block = metadata.get("nbcluster")
    return block if isinstance(block, dict) else {}


def _resources_of(metadata: dict[str, Any]) -> dict[str, str]:
    value = _stanza(metadata).get("resources")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError('nbcluster resources must be an object such as {"gpus": 1}')
    defaults: dict[str, str] = {}
    for key, number in value.items():
        if key not in _RESOURCE_KEYS:
            raise ValueError(
                f"nbcluster resources: unknown resource {key!r} (one of "
                f"{', '.join(_RESOURCE_KEYS)})"
            )
        whole = key == "gpus"
        if (
            isinstance(number, bool)
            or not isinstance(number, int | float)
            or (whole and not isinstance(number, int))
            or not math.isfinite(number)
            or number < 0
        ):
            kind = "a whole number" if whole else "a number"
            raise ValueError(f"nbcluster resources {key}: must be {kind} >= 0, not {number!r}")
        defaults[_RESOURCE_KEYS[key]] = str(number)
    return defaults


def _allowed_env_of(metadata: dict[str, Any]) -> tuple[str, ...]:
    value = _stanza(metadata).get("allowed_env")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("nbcluster allowed_env must be a list of variable names")
    for entry in value:
        if not _ENV_PATTERN.fullmatch(entry):
            raise ValueError(
                f"nbcluster allowed_env: {entry!r} is not a variable name (or a prefix "
                "followed by *)"
            )
        if entry.upper().startswith(("NBCLUSTER", "JPY_")):
            raise ValueError(
                f"nbcluster allowed_env: {entry!r} would let clients set the gateway's own "
                "variables (NBCLUSTER_*, JPY_*)"
            )
    return tuple(value)


def _launch_timeout_of(metadata: dict[str, Any]) -> float | None:
    for section in ("nbcluster", "kernel_provisioner"):
        block = metadata.get(section)
        if section == "kernel_provisioner" and isinstance(block, dict):
            block = block.get("config")
        if not isinstance(block, dict) or block.get("launch_timeout") is None:
            continue
        value = block["launch_timeout"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{section} launch_timeout: must be seconds > 0, not {value!r}")
        return float(value)
    return None


def _remote_hosts_of(metadata: dict[str, Any]) -> tuple[str, ...]:
    for section in ("kernel_provisioner", "nbcluster"):
        block = metadata.get(section)
        if section == "kernel_provisioner" and isinstance(block, dict):
            block = block.get("config")
        if not isinstance(block, dict) or block.get("remote_hosts") is None:
            continue
        value = block["remote_hosts"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{section} remote_hosts must be a non-empty list of machines")
        try:
            machines = parse_machines(value)
        except ValueError as exc:
            raise ValueError(f"{section} remote_hosts: {exc}") from None
        return tuple(str(m) for m in machines)
    return ()


def _pool_of(metadata: dict[str, Any]) -> str | None:
    for section, key in (("nbcluster", "pool"), ("kernel_provisioner", "host_pool")):
        block = metadata.get(section)
        if section == "kernel_provisioner" and isinstance(block, dict):
            block = block.get("config")
        if isinstance(block, dict) and block.get(key) is not None:
            try:
                return check_pool(block[key])
            except ValueError as exc:
                raise ValueError(f"{section} {key}: {exc}") from None
    return None


def _image_of(metadata: dict[str, Any]) -> str | None:
    for section, key in (("kernel_provisioner", "image_name"), ("nbcluster", "image")):
        block = metadata.get(section)
        if section == "kernel_provisioner" and isinstance(block, dict):
            block = block.get("config")
        if isinstance(block, dict) and block.get(key) is not None:
            value = block[key]
            if not isinstance(value, str):
                raise ValueError(f"{section} {key} must be a string, not {type(value).__name__}")
            return value
    return None


def _builtin_python3() -> tuple[KernelSpec, Path | None]:
    spec = KernelSpec(
        argv=["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
        display_name="Python 3 (nbcluster)",
        language="python",
        interrupt_mode="signal",
        metadata={"debugger": False, "nbcluster": {"replicated": True}},
    )
    try:
        import ipykernel

        resources: Path | None = Path(ipykernel.__file__).parent / "resources"
    except ImportError:  # pragma: no cover - ipykernel is a dependency
        resources = None
    return spec, resources


class KernelSpecRegistry:
    """Looked up by the REST API (listing, resources) and by the kernel manager (argv, env)."""

    def __init__(self, directories: tuple[Path, ...] = ()) -> None:
        self._specs: dict[str, tuple[KernelSpec, Path | None]] = {}
        self._specs[DEFAULT_KERNEL_NAME] = _builtin_python3()
        for directory in directories:
            self._load_dir(directory)

    def _load_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            log.error("kernelspec directory %s does not exist", directory)
            return
        for spec_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            try:
                self._specs[spec_dir.name] = (self.load_file(spec_dir / "kernel.json"), spec_dir)
            except KernelSpecError as exc:
                log.error("skipping kernelspec: %s", exc)

    @staticmethod
    def load_file(path: Path) -> KernelSpec:
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise KernelSpecError(f"{path}: cannot read: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise KernelSpecError(f"{path}: not valid JSON: {exc}") from None
        try:
            return KernelSpec.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "kernel.json"
            raise KernelSpecError(f"{path}: {where}: {first['msg']}") from None

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> KernelSpec | None:
        entry = self._specs.get(name)
        return entry[0] if entry else None

    def remote_hosts(self) -> tuple[str, ...]:
        """Every machine some kernelspec names in ``remote_hosts``, each once, in kernelspec
        name order: the gateway gives them to its ssh host provider."""
        seen: dict[str, None] = {}
        for name in self.names:
            for machine in self._specs[name][0].remote_hosts:
                seen.setdefault(machine, None)
        return tuple(seen)

    def resource_path(self, name: str, filename: str) -> Path | None:
        entry = self._specs.get(name)
        if entry is None or entry[1] is None or filename not in _RESOURCE_FILES:
            return None
        path = entry[1] / filename
        return path if path.is_file() else None

    def model(self, name: str, base_url: str = "") -> dict[str, Any]:
        """The Jupyter REST model of one spec (``GET /api/kernelspecs/{name}``)."""
        spec = self._specs[name][0]
        resources = {
            Path(f).stem: f"{base_url}/kernelspecs/{name}/{f}"
            for f in _RESOURCE_FILES
            if self.resource_path(name, f)
        }
        return {"name": name, "spec": spec.model_dump(), "resources": resources}

    def models(self, names: list[str] | None = None) -> dict[str, Any]:
        """``GET /api/kernelspecs``: every spec, or those of ``names`` (the ones the caller
        may start)."""
        shown = self.names if names is None else [n for n in self.names if n in names]
        return {
            "default": DEFAULT_KERNEL_NAME,
            "kernelspecs": {name: self.model(name) for name in shown},
        }
