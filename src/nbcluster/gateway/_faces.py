"""The gateway's ZMQ faces (``_zmq_face``), at most one per kernel: opened on the first
``GET /api/cluster/kernels/{id}/connection``, kept while the kernel lives (a restart keeps
it: same ports, same keys), closed when the kernel is shut down, when its owner revokes it
(``DELETE``: the next ``GET`` opens a new one with new keys) or when the gateway stops.

Faces bind on the gateway's own address (``--ip``, loopback by default), within
``--port-range`` when one is given. Each face is kept in its kernel's record (``FaceRecord``:
ports and keys); a restarted gateway binds it again as it was (:meth:`ZmqFaces.restore`), so
its clients reconnect on their own (ZMQ reconnects; same keys). A face that cannot be bound
as it was (a port taken meanwhile, outside a changed ``--port-range``, or encrypted where
CurveZMQ is now off, or the other way round) is dropped with a warning: the next ``GET``
opens a new one, with new ports and keys.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable

import zmq

from .._curve import new_server_secret
from .._tasks import BackgroundTasks
from ..protocol import KernelConnection
from ._config import GatewayConfig
from ._face_rules import PortRange, advertised_ip
from ._kernel import GatewayKernel
from ._metrics import GatewayMetrics
from ._state import FaceRecord, KernelRecord
from ._zmq_face import FaceKeys, KernelControl, ZmqFace

__all__ = ["ZmqFaces"]

log = logging.getLogger(__name__)


class ZmqFaces:
    """Built by the gateway (``Gateway.faces``); the connection API calls
    :meth:`connection` and :meth:`revoke`."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        control: KernelControl,
        save_record: Callable[[KernelRecord], None],
    ) -> None:
        self._config = config
        self._save_record = save_record
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
        keys = FaceKeys(
            key=secrets.token_hex(32),
            curve_secret=new_server_secret() if self._config.curve else None,
        )
        face = self._face(kernel, keys)
        connection = face.open()
        self._faces[kernel.id] = face
        kernel.record.face = FaceRecord(
            shell_port=connection.shell_port,
            iopub_port=connection.iopub_port,
            stdin_port=connection.stdin_port,
            control_port=connection.control_port,
            hb_port=connection.hb_port,
            key=keys.key,
            curve_secret=keys.curve_secret,
        )
        self._save_record(kernel.record)
        return connection

    def restore(self, kernels: Iterable[GatewayKernel]) -> None:
        """Called once by the gateway at start-up, after the kernel manager re-attached to its
        kernels: bind again the faces their records keep (see the module docstring)."""
        for kernel in kernels:
            record = kernel.record.face
            if record is None or kernel.is_dead:
                continue
            problem = self._cannot_restore(record)
            if problem is None:
                face = self._face(
                    kernel, FaceKeys(key=record.key, curve_secret=record.curve_secret)
                )
                try:
                    face.open(record.ports_of())
                except zmq.ZMQError as exc:
                    problem = f"a port is taken ({exc})"
                else:
                    self._faces[kernel.id] = face
                    continue
            log.warning(
                "kernel %s: its ZMQ face could not be opened again as it was: %s; its "
                "clients need a new connection file (GET /api/cluster/kernels/%s/connection)",
                kernel.id,
                problem,
                kernel.id,
            )
            kernel.record.face = None
            self._save_record(kernel.record)

    def _cannot_restore(self, record: FaceRecord) -> str | None:
        if (record.curve_secret is not None) != self._config.curve:
            return "CurveZMQ was turned " + ("on" if self._config.curve else "off")
        ports = record.ports_of().values()
        if self._range is not None and not all(
            self._range.low <= p <= self._range.high for p in ports
        ):
            return f"its ports are outside --port-range {self._range}"
        return None

    def _face(self, kernel: GatewayKernel, keys: FaceKeys) -> ZmqFace:
        return ZmqFace(
            kernel,
            self._context,
            bind_ip=self._config.ip,
            advertised_ip=self._advertised_ip,
            port_range=self._range,
            keys=keys,
            kernel_name=kernel.record.name,
            control=self._control,
            spawn=self._background.spawn,
            on_reject=self._metrics.reject,
            on_closed=self._closed,
        )

    def revoke(self, kernel: GatewayKernel) -> bool:
        """Close the kernel's face (its clients are cut off); False when it had none."""
        face = self._faces.pop(kernel.id, None)
        if face is None:
            return False
        face.close()
        kernel.record.face = None
        self._save_record(kernel.record)
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
