"""A kernel's ZMQ face kept in its record and bound again by a restarted gateway
(``gateway/_faces``): same ports and keys when it can be; dropped, saved and said when a port
is taken or CurveZMQ was switched. Real ZMQ sockets on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from nbcluster.gateway import GatewayConfig, KernelRecord
from nbcluster.gateway._faces import ZmqFaces
from nbcluster.gateway._metrics import GatewayMetrics

from .fakes import make_kernel


class NoControl:
    async def interrupt_kernel(self, kernel_id: str) -> None:
        raise AssertionError("not in these tests")

    async def shutdown_kernel(self, kernel_id: str) -> None:
        raise AssertionError("not in these tests")


class Gateway:
    """One run of the gateway's faces, over records saved to a dict."""

    def __init__(self, tmp_path: Path, saved: dict[str, KernelRecord], curve: bool = True):
        config = GatewayConfig(token="t", state_dir=tmp_path / "state", curve=curve)
        self.saved = saved
        self.faces = ZmqFaces(config, GatewayMetrics(), NoControl(), self.save)

    def save(self, record: KernelRecord) -> None:
        self.saved[record.id] = record.model_copy(deep=True)


@pytest.fixture
async def first(tmp_path: Path) -> AsyncIterator[tuple[Gateway, dict[str, KernelRecord]]]:
    saved: dict[str, KernelRecord] = {}
    gateway = Gateway(tmp_path, saved)
    yield gateway, saved
    await gateway.faces.close()


async def test_a_face_is_saved_and_bound_again_as_it_was(
    tmp_path: Path, first: tuple[Gateway, dict[str, KernelRecord]]
) -> None:
    gateway, saved = first
    kernel, _ = make_kernel("r1")
    info = gateway.faces.connection(kernel)
    kept = saved[kernel.id].face
    assert kept is not None and kept.key == info.key and kept.shell_port == info.shell_port
    assert kept.curve_secret == info.curve_secretkey
    await gateway.faces.close()  # the gateway stops

    again, _ = make_kernel("r1")
    again.record.face = kept
    restarted = Gateway(tmp_path, saved)
    try:
        restarted.faces.restore([again])
        assert restarted.faces.connection(again) == info
    finally:
        await restarted.faces.close()


@pytest.mark.parametrize("why", ["port taken", "curve switched off"])
async def test_a_face_that_cannot_be_bound_as_it_was_is_dropped(
    tmp_path: Path, first: tuple[Gateway, dict[str, KernelRecord]], why: str
) -> None:
    gateway, saved = first
    kernel, _ = make_kernel("r1")
    info = gateway.faces.connection(kernel)
    kept = saved[kernel.id].face
    await gateway.faces.close()

    context = zmq.Context()
    squatter = context.socket(zmq.ROUTER)
    if why == "port taken":
        squatter.bind(f"tcp://127.0.0.1:{info.iopub_port}")
    again, _ = make_kernel("r1")
    again.record.face = kept
    restarted = Gateway(tmp_path, saved, curve=why != "curve switched off")
    try:
        restarted.faces.restore([again])
        assert restarted.faces.get(again.id) is None
        assert saved[again.id].face is None  # the record says so for the next restart
        fresh = restarted.faces.connection(again)  # the next GET opens a new face
        assert fresh.key != info.key
    finally:
        await restarted.faces.close()
        squatter.close(linger=0)
        context.term()
