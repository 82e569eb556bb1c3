"""The scheduler driver's :class:`~._driver.Evictor`: asks a replica to move the GPU memory its
namespace holds to host memory (``nbcluster_evict_request`` on its control channel, answered by
``nbcluster_evict_reply``), and turns every way that can fail into ``ok=False`` with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..protocol import ControlErrorReply, EvictReply, EvictRequest
from ._control import control_request
from ._driver import EvictionResult
from ._kernel import GatewayKernel

__all__ = ["EVICT_TIMEOUT", "ReplicaEvictor"]

log = logging.getLogger(__name__)

#: How long a replica may take to move its GPU memory to the host (tens of GB at a few GB/s,
#: and a cell that must reach a safe point on control) before the eviction counts as failed.
EVICT_TIMEOUT = 120.0


class ReplicaEvictor:
    """Created by the kernel manager over its kernels (read when an eviction is carried out)."""

    def __init__(
        self, kernels: Mapping[str, GatewayKernel], timeout: float = EVICT_TIMEOUT
    ) -> None:
        self._kernels = kernels
        self._timeout = timeout

    async def evict(
        self, kernel_id: str, replica_id: str, devices: tuple[int, ...], reason: str
    ) -> EvictionResult:
        kernel = self._kernels.get(kernel_id)
        link = None if kernel is None else kernel.links.get(replica_id)
        if kernel is None or link is None:
            return EvictionResult(False, error=f"replica {replica_id} is not connected")
        request = EvictRequest(devices=list(devices), reason=reason)
        try:
            reply = await control_request(
                kernel, link, "control", request, EvictReply, self._timeout
            )
        except TimeoutError:
            return EvictionResult(False, error=f"no answer in {self._timeout:g} s")
        except Exception as exc:  # the link closed, the kernel died ...
            return EvictionResult(False, error=f"{type(exc).__name__}: {exc}")
        if isinstance(reply, ControlErrorReply):
            return EvictionResult(False, error=f"{reply.ename}: {reply.evalue}")
        log.info(
            "kernel %s replica %s moved %d objects (%d bytes) off GPU %s in %.2f s: %s",
            kernel_id,
            replica_id,
            reply.moved_objects,
            reply.freed_bytes,
            list(devices),
            reply.seconds,
            reason,
        )
        return EvictionResult(True, reply.freed_bytes, reply.moved_objects)
