"""What a kernelspec's ``metadata.kernel_provisioner.config`` may say to the nbcluster
provisioner (``nbcluster kernelspec install`` writes it), validated with errors that name the
field.

The credentials are never in the kernelspec itself (a file every user of the machine may
read): ``token_env`` names the environment variable of the Jupyter server that holds the
token (default ``NBCLUSTER_TOKEN``), or ``token_file`` a file that holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import envvars

__all__ = ["ProvisionerConfig", "ProvisionerConfigError"]


class ProvisionerConfigError(ValueError):
    """The kernelspec's provisioner config, or the credentials it points to, cannot be used."""


class ProvisionerConfig(BaseModel):
    """The ``kernel_provisioner.config`` stanza of an nbcluster kernelspec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway_url: str = Field(description="The gateway's URL, http(s)://HOST:PORT.")
    token_env: str = Field(
        envvars.TOKEN.name,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable of the Jupyter server holding the API token.",
    )
    token_file: Path | None = Field(None, description="File holding the token instead.")
    ca: Path | None = Field(None, description="CA file (PEM) to verify an https gateway with.")
    kernel_name: str = Field(
        "python3", min_length=1, description="The gateway's kernelspec to start."
    )
    gpus: int | None = Field(None, ge=0, description="KERNEL_GPUS: GPUs per cell.")
    cpus: float | None = Field(None, gt=0, description="KERNEL_CPUS.")
    memory_mb: int | None = Field(None, gt=0, description="KERNEL_MEMORY_MB.")
    launch_timeout: float = Field(
        120.0, gt=0, le=3600, description="Seconds a start or restart may take."
    )

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")

    @classmethod
    def from_stanza(cls, stanza: dict[str, Any]) -> ProvisionerConfig:
        """Validate a kernelspec's stanza; ProvisionerConfigError naming each wrong field."""
        from pydantic import ValidationError

        try:
            return cls.model_validate(stanza)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ProvisionerConfigError(
                f"invalid nbcluster kernel_provisioner config: {problems}"
            ) from None

    def token(self, environ: dict[str, str] | None = None) -> str:
        """The API token, from ``token_file`` or else the ``token_env`` variable."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                raise ProvisionerConfigError(
                    f"cannot read the nbcluster token file {self.token_file}: {exc.strerror}"
                ) from None
            if not token:
                raise ProvisionerConfigError(f"the nbcluster token file {self.token_file} is empty")
            return token
        env = os.environ if environ is None else environ
        token = env.get(self.token_env, "").strip()
        if not token:
            raise ProvisionerConfigError(
                f"no nbcluster token: set {self.token_env} in the Jupyter server's environment "
                "(or name a token_file in the kernelspec's kernel_provisioner config)"
            )
        return token

    def kernel_env(self) -> dict[str, str]:
        """The ``KERNEL_*`` resource requests this kernelspec makes."""
        env: dict[str, str] = {}
        if self.gpus is not None:
            env["KERNEL_GPUS"] = str(self.gpus)
        if self.cpus is not None:
            env["KERNEL_CPUS"] = f"{self.cpus:g}"
        if self.memory_mb is not None:
            env["KERNEL_MEMORY_MB"] = str(self.memory_mb)
        return env
