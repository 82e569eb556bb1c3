"""The Jupyter messaging protocol as nbcluster speaks it.

Messages travel as :class:`Message` objects holding raw JSON parts; the codecs here convert them
from and to ZMQ frames (signed) and both websocket framings, naming the problem in a
:class:`ProtocolError` whenever a frame cannot be accepted.
"""

from ._errors import ProtocolError
from ._message import CLIENT_CHANNELS, KERNEL_CHANNELS, Message, dumps, new_message
from ._websocket import V1_SUBPROTOCOL, decode_legacy, decode_v1, encode_legacy, encode_v1
from ._zmq_wire import DELIMITER, Signer, decode_zmq, encode_zmq

__all__ = [
    "CLIENT_CHANNELS",
    "DELIMITER",
    "KERNEL_CHANNELS",
    "V1_SUBPROTOCOL",
    "Message",
    "ProtocolError",
    "Signer",
    "decode_legacy",
    "decode_v1",
    "decode_zmq",
    "dumps",
    "encode_legacy",
    "encode_v1",
    "encode_zmq",
    "new_message",
]
