"""Stand-ins for websocket clients and replica links, recording what they are given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nbcluster.gateway import GatewayKernel, KernelRecord, ReplicaRecord
from nbcluster.hostproto import ConnectionInfo
from nbcluster.protocol import Message

__all__ = ["FakeClient", "FakeLink", "make_kernel"]


class FakeClient:
    """A websocket client as GatewayKernel sees it."""

    def __init__(self, name: str = "client") -> None:
        self.name = name
        self.sent: list[Message] = []
        self.closed: tuple[int, str] | None = None

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)

    def types(self) -> list[tuple[str, str]]:
        return [(m.channel, m.msg_type) for m in self.sent]

    def __repr__(self) -> str:
        return f"FakeClient({self.name})"


class FakeLink:
    """A replica link: records what the gateway sends; ``on_send`` may answer or fail."""

    def __init__(self, replica_id: str = "r1") -> None:
        self.replica_id = replica_id
        self.sent: list[Message] = []
        self.on_send: Callable[[Message], Any] | None = None
        self.closed = False

    def send(self, msg: Message) -> None:
        self.sent.append(msg)
        if self.on_send is not None:
            self.on_send(msg)

    def close(self) -> None:
        self.closed = True


def make_kernel(*replica_ids: str, **kwargs: Any) -> tuple[GatewayKernel, dict[str, FakeLink]]:
    """A kernel whose replicas are running and linked through fake links (first is executor)."""
    connection = ConnectionInfo(
        ip="127.0.0.1", shell_port=1, iopub_port=2, stdin_port=3, control_port=4, hb_port=5
    )
    record = KernelRecord(
        id="k-0001",
        name="python3",
        key="secret",
        replicas=[
            ReplicaRecord(replica_id=r, host=f"h{i}", state="running", connection=connection)
            for i, r in enumerate(replica_ids)
        ],
    )
    kernel = GatewayKernel(record, **kwargs)
    links = {r: FakeLink(r) for r in replica_ids}
    kernel.links.update(links)  # type: ignore[arg-type]
    kernel.executor_link()  # the first running replica with a link: replica_ids[0]
    kernel.started()
    return kernel, links
