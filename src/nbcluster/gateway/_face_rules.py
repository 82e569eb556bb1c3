"""The decisions of a kernel's ZMQ face (``_zmq_face``), pure: what to do with a message a
ZMQ client sent, which IOPub messages are published (once each), which ports a face may bind
and which address its connection info names.

A face stands in for one ipykernel, so a few requests are the face's to answer rather than a
replica's: ``interrupt_request`` interrupts the kernel as ``POST /api/kernels/{id}/interrupt``
does (cells waiting for GPUs included), and ``shutdown_request`` ends the kernel as the REST
``DELETE`` does, where a replica receiving it would only end itself (and be replaced). A
``shutdown_request`` with ``restart: true`` is answered and nothing else: the kernel's manager
(a Jupyter server's, through the provisioner) restarts it through the REST API.
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ..protocol import Message

__all__ = [
    "FaceAction",
    "PortRange",
    "PublishedOnce",
    "advertised_ip",
    "classify",
    "is_ipv6",
    "parse_port_range",
]

#: ``forward``: route to the replicas like a websocket client's message; ``interrupt``:
#: interrupt the kernel and answer ``interrupt_reply``; ``shutdown``: answer
#: ``shutdown_reply`` and shut the kernel down; ``restart_ack``: answer ``shutdown_reply`` only.
FaceAction = Literal["forward", "interrupt", "shutdown", "restart_ack"]


def classify(msg: Message) -> FaceAction:
    """What the face does with ``msg`` from a ZMQ client (its signature already checked)."""
    if msg.msg_type == "interrupt_request" and msg.channel == "control":
        return "interrupt"
    if msg.msg_type == "shutdown_request" and msg.channel in ("control", "shell"):
        return "restart_ack" if msg.content_dict.get("restart") is True else "shutdown"
    return "forward"


class PublishedOnce:
    """The ids of the last ``limit`` IOPub messages published: the kernel hands a broadcast
    to each of its clients, and every ZMQ client of a face subscribes to one PUB socket, so
    the face publishes a message the first time one of its clients is handed it."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, msg_id: str) -> bool:
        """True the first time ``msg_id`` is seen (then it is remembered)."""
        if msg_id in self._seen:
            return False
        self._seen[msg_id] = None
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True


@dataclass(frozen=True, slots=True)
class PortRange:
    """The ports faces may bind, both ends included (Gateway Provisioners' ``port_range``)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1024 <= self.low <= self.high <= 65535:
            raise ValueError(
                f"port range {self.low}..{self.high} must lie within 1024..65535, low <= high"
            )
        if self.size < 5:
            raise ValueError(
                f"port range {self.low}..{self.high} has {self.size} ports; a kernel's face needs 5"
            )

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def candidates(self, rng: random.Random | None = None) -> Iterator[int]:
        """Every port of the range once, in random order (faces opened at once do not all
        try the same ports first)."""
        ports = list(range(self.low, self.high + 1))
        (rng or random).shuffle(ports)
        yield from ports

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


def parse_port_range(text: str) -> PortRange:
    """``LOW..HIGH`` (``--port-range``; ``LOW-HIGH`` is accepted too, as Gateway Provisioners
    write it). ValueError naming what is wrong."""
    for separator in ("..", "-"):
        if separator in text:
            low_text, _, high_text = text.partition(separator)
            break
    else:
        raise ValueError(f"port range {text!r} is not LOW..HIGH (e.g. 40000..40999)")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise ValueError(f"port range {text!r}: LOW and HIGH must be integers") from None
    return PortRange(low, high)


def advertised_ip(bind_ip: str, public_url: str | None) -> str:
    """The address a face's connection info names: where it listens, unless that is a
    wildcard; then the host of the gateway's public URL if it is an address or a name, else
    loopback (a client elsewhere then needs the operator to say where the gateway is)."""
    if bind_ip not in ("0.0.0.0", "::", ""):
        return bind_ip
    host = urlsplit(public_url).hostname if public_url else None
    if host:
        return host
    return "127.0.0.1"


def is_ipv6(ip: str) -> bool:
    """Whether ``ip`` is an IPv6 address (ZMQ needs the socket told, and brackets)."""
    try:
        return ipaddress.ip_address(ip).version == 6
    except ValueError:
        return False
