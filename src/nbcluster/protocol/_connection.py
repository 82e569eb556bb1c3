"""The connection info of a kernel's ZMQ face: what the gateway's
``GET /api/cluster/kernels/{id}/connection`` answers and what the kernel provisioner hands
jupyter_client. Its fields are those of a Jupyter connection file, so ``model_dump`` of it is
a connection file that ``jupyter console --existing`` and ``BlockingKernelClient`` read.

The CurveZMQ keys follow jupyter_client's convention (>= 8.9, ``transport_encryption``): the
face's sockets are CURVE servers with the keypair ``curve_publickey``/``curve_secretkey``, and
a client that holds the file uses the same pair (the server's) to connect. Both halves are as
secret as ``key``: whoever has the file may use the kernel.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["KernelConnection"]

_Port = Field(ge=1, le=65535)
_Z85_KEY = r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"


class KernelConnection(BaseModel):
    """A Jupyter connection file for one kernel's ZMQ face (five TCP ports, HMAC key, and
    the CurveZMQ server keypair when the gateway encrypts the face)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["tcp"] = "tcp"
    ip: str = Field(min_length=1, description="Where the face listens.")
    shell_port: int = _Port
    iopub_port: int = _Port
    stdin_port: int = _Port
    control_port: int = _Port
    hb_port: int = _Port
    key: str = Field(min_length=32, description="HMAC key of this face (not the kernel's).")
    signature_scheme: Literal["hmac-sha256"] = "hmac-sha256"
    kernel_name: str = Field("", description="The kernelspec the kernel was started with.")
    curve_publickey: str | None = Field(None, pattern=_Z85_KEY)
    curve_secretkey: str | None = Field(None, pattern=_Z85_KEY)

    @property
    def ports(self) -> tuple[int, int, int, int, int]:
        """The five ports: shell, iopub, stdin, control, heartbeat."""
        return (self.shell_port, self.iopub_port, self.stdin_port, self.control_port, self.hb_port)

    def connection_file(self) -> dict[str, Any]:
        """The JSON of a connection file (no null keys: jupyter_client reads an absent key
        as "no encryption", a null one as a key)."""
        return self.model_dump(exclude_none=True)
