"""The gateway's side of the typed control protocol (``nbcluster.protocol._control``): send a
control request to one replica and read its reply; read a replica's ``kernel_info``.

Used by the kernel manager for group formation, membership changes, restore and checkpoints,
and by the evictor (``_evictor``) to have a replica free GPU memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from ..protocol import (
    METADATA_KEY,
    CheckpointReply,
    ControlErrorReply,
    ControlRequest,
    EvictReply,
    MembershipReply,
    RaftStartReply,
    ReplicaInfo,
    parse_reply,
)
from ._kernel import GatewayKernel
from ._replica import ReplicaLink

__all__ = ["control_request", "replica_last_term"]

log = logging.getLogger(__name__)

_Reply = TypeVar("_Reply", RaftStartReply, MembershipReply, CheckpointReply, EvictReply)


async def control_request(
    kernel: GatewayKernel,
    link: ReplicaLink,
    channel: str,
    request: ControlRequest,
    reply_model: type[_Reply],
    timeout: float,
) -> _Reply | ControlErrorReply:
    """Send ``request`` to one replica and read its reply: the ``ok`` model, or the error it
    answered (a malformed reply comes back as a ``ControlErrorReply`` naming what is wrong).
    Raises ``TimeoutError`` after ``timeout`` seconds without a reply."""
    reply = await kernel.request(
        link, channel, request.msg_type, request.model_dump(mode="json"), timeout
    )
    return parse_reply(reply_model, reply.content_dict)


def replica_last_term(kernel: GatewayKernel, info: Mapping[str, Any]) -> int:
    """The last term whose state a replica has applied, from its ``kernel_info_reply``
    (0 when it says nothing: a kernelspec that is not nbcluster's replica kernel, or a
    malformed block, which is logged)."""
    block = info.get(METADATA_KEY)
    if block is None:
        return 0
    try:
        return ReplicaInfo.model_validate(block).last_term
    except ValidationError as exc:
        log.warning("kernel %s: malformed kernel_info %s: %s", kernel.id, METADATA_KEY, exc)
        return 0
