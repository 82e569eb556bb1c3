"""The gateway's ZMQ faces (``_zmq_face``), at most one per kernel: opened on the first
``GET /api/cluster/kernels/{id}/connection``, kept while the kernel lives (a restart keeps
it: same ports, same keys), closed when the kernel is shut down, when its owner revokes it
(``DELETE``: the next ``GET`` opens a new one with new keys) or when the gateway stops.

Faces bind on the gateway's own address (``--ip``, loopback by default), within
``--port-range`` when one is given. They are not persisted: after a gateway restart the next
``GET`` opens a new face (the provisioner asks again when it re-attaches).
"""

from __future__ import annotations

import logging
import secrets

import zmq

from .._curve import new_server_secret
from .._tasks import BackgroundTasks
from ..protocol import KernelConnection
from ._config import GatewayConfig
from ._face_rules import PortRange, advertised_ip
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics
from ._zmq_face import FaceKeys, KernelControl, ZmqFace

__all__ = ["ZmqFaces"]

log = logging.getLogger(__name__)


class ZmqFaces:
    """Built by the gateway (``Gateway.faces``); the connection API calls
    :meth:`connection` and :meth:`revoke`."""

    def __init__(
        self, config: GatewayConfig, metrics: GatewayMetrics, control: KernelControl
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._control = control
        self._range = None if config.zmq_port_range is None else PortRange(*config.zmq_port_range)
        self._advertised_ip = advertised_ip(config.ip, config.public_url)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._faces: dict[str, ZmqFace] = {}
        self._background = BackgroundTasks("zmq faces", log)

    def __len__(self) -> int:
        return len(self._faces)

    def get(self, kernel_id: str) -> ZmqFace | None:
        return self._faces.get(kernel_id)

    def connection(self, kernel: GatewayKernel) -> KernelConnection:
        """The kernel's face's connection info, opening the face first if it has none.
        Raises ``FacePortsExhausted`` when the port range is full."""
        face = self._faces.get(kernel.id)
        if face is not None and face.connection is not None and not face.closed:
            return face.connection
        face = ZmqFace(
            kernel,
            self._context,
            bind_ip=self._config.ip,
            advertised_ip=self._advertised_ip,
            port_range=self._range,
            keys=FaceKeys(
                key=secrets.token_hex(32),
                curve_secret=new_server_secret() if self._config.curve else None,
            ),
            kernel_name=kernel.record.name,
            control=self._control,
            spawn=self._background.spawn,
            on_reject=self._metrics.reject,
            on_closed=self._closed,
        )
        connection = face.open()
        self._faces[kernel.id] = face
        return connection

    def revoke(self, kernel_id: str) -> bool:
        """Close the kernel's face (its clients are cut off); False when it had none."""
        face = self._faces.pop(kernel_id, None)
        if face is None:
            return False
        face.close()
        return True

    def _closed(self, face: ZmqFace) -> None:
        if self._faces.get(face.kernel.id) is face:
            del self._faces[face.kernel.id]

    async def close(self) -> None:
        """Close every face (the gateway stops)."""
        for face in list(self._faces.values()):
            face.close()
        await self._background.close()
        self._context.destroy(linger=0)
