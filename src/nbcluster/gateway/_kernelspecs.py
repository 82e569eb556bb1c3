"""The kernelspecs the gateway offers: the built-in ``python3`` plus operator-supplied ones.

An operator adds kernelspecs as directories holding a ``kernel.json`` (the Jupyter layout)
under a ``--kernelspec-dir``. A spec that fails validation is skipped with an error naming the
file and the problem; the gateway keeps serving the others.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..hostproto import IMAGE_REFERENCE, check_pool
from ._errors import KernelSpecError

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
