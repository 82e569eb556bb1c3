"""The Jupyter messaging protocol as nbcluster speaks it.

Messages travel as :class:`Message` objects holding raw JSON parts; the codecs here convert them
from and to ZMQ frames (signed) and both websocket framings, naming the problem in a
:class:`ProtocolError` whenever a frame cannot be accepted. The gateway ↔ replica control
messages carried inside them (group formation, membership, checkpoints, evictions, the ``nbcluster``
metadata of an ``execute_request``) are pydantic models (``_control``).
"""

from ._cells import CPU_MAGIC, cpu_magic_line
from ._connection import KernelConnection
from ._control import (
    CONTROL_ERROR_ENAME,
    METADATA_KEY,
    YIELD_ENAME,
    CheckpointReply,
    CheckpointRequest,
    ControlErrorReply,
    ControlMessageError,
    ControlReply,
    ControlRequest,
    DeviceMemory,
    EvictReply,
    EvictRequest,
    ExecuteMetadata,
    ExecutionYielded,
    LogStatus,
    MembershipReply,
    MembershipRequest,
    RaftStartReply,
    RaftStartRequest,
    ReplicaInfo,
    RestorePoint,
    check_gpus,
    parse_execute_metadata,
    parse_reply,
    parse_request,
    read_device_memory,
    read_yielded,
)
from ._errors import ProtocolError
from ._message import CLIENT_CHANNELS, KERNEL_CHANNELS, Message, dumps, new_message
from ._websocket import V1_SUBPROTOCOL, decode_legacy, decode_v1, encode_legacy, encode_v1
from ._zmq_wire import DELIMITER, Signer, decode_zmq, encode_zmq

__all__ = [
    "CLIENT_CHANNELS",
    "CONTROL_ERROR_ENAME",
    "CPU_MAGIC",
    "DELIMITER",
    "KERNEL_CHANNELS",
    "METADATA_KEY",
    "V1_SUBPROTOCOL",
    "YIELD_ENAME",
    "CheckpointReply",
    "CheckpointRequest",
    "ControlErrorReply",
    "ControlMessageError",
    "ControlReply",
    "ControlRequest",
    "DeviceMemory",
    "EvictReply",
    "EvictRequest",
    "ExecuteMetadata",
    "ExecutionYielded",
    "KernelConnection",
    "LogStatus",
    "MembershipReply",
    "MembershipRequest",
    "Message",
    "ProtocolError",
    "RaftStartReply",
    "RaftStartRequest",
    "ReplicaInfo",
    "RestorePoint",
    "Signer",
    "check_gpus",
    "cpu_magic_line",
    "decode_legacy",
    "decode_v1",
    "decode_zmq",
    "dumps",
    "encode_legacy",
    "encode_v1",
    "encode_zmq",
    "new_message",
    "parse_execute_metadata",
    "parse_reply",
    "parse_request",
    "read_device_memory",
    "read_yielded",
]
