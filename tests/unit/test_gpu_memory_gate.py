"""GPU memory through the gateway (issue 12): a replica's ``execute_reply`` says what it keeps
on its GPUs; a cell bound to a device another kernel keeps memory on waits while the gateway
asks that replica (``nbcluster_evict_request`` on control) to move it away, then runs and says
so; a replica that does not answer gets the cell refused. Real GatewayKernels and driver, fake
replica links."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from nbcluster.gateway._driver import SchedulerDriver
from nbcluster.gateway._evictor import ReplicaEvictor
from nbcluster.protocol import EvictReply, EvictRequest, Message, new_message
from nbcluster.scheduling import GIB

from .fakes import FakeLink
from .test_gpu_gate import Cluster, Kern


def with_evictor(cluster: Cluster, timeout: float = 5.0) -> ReplicaEvictor:
    """Give the cluster a driver whose evictor talks to its kernels (before any kernel)."""
    evictor = ReplicaEvictor(cluster.kernels, timeout=timeout)
    cluster.scheduling = SchedulerDriver(
        cluster.kernels,
        cluster.metrics,
        max_subscription_ratio=7.0,
        replicas_per_kernel=3,
        mover=cluster.mover,
        hosts=cluster.hosts,
        evictor=evictor,
    )
    return evictor


def answer_evictions(link: FakeLink, kernel: Kern, freed: int) -> list[dict[str, Any]]:
    """The replica behind ``link`` answers every eviction request; returns their contents."""
    asked: list[dict[str, Any]] = []

    def on_send(msg: Message) -> None:
        if msg.msg_type != EvictRequest.msg_type:
            return
        assert msg.channel == "control"
        asked.append(msg.content_dict)
        reply = EvictReply(freed_bytes=freed, moved_objects=2, seconds=0.4)
        answer = new_message("control", reply.msg_type, reply.model_dump(mode="json"), parent=msg)
        kernel.kernel.on_replica_message(link, answer)  # type: ignore[arg-type]

    link.on_send = on_send
    return asked


async def evictions_done() -> None:
    tasks = [t for t in asyncio.all_tasks() if "evict GPU memory" in t.get_name()]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


def leave_memory_on_gpu_0(cluster: Cluster, a: Kern, size: int) -> str:
    request = a.run("model = Net().cuda()")
    a.reply(request, nbcluster={"device_memory": {"held": {"0": size}}})
    [replica] = a.links
    [device] = cluster.scheduling.device_memory("h1")
    assert dict(device.held) == {(a.id, replica): size}
    return replica


async def test_a_cell_waits_for_another_kernels_tensors_to_leave_the_gpu() -> None:
    cluster = Cluster()
    with_evictor(cluster)
    cluster.add_host("h1", gpus=1)
    a, b = cluster.add_kernel("a"), cluster.add_kernel("b")
    a_replica = leave_memory_on_gpu_0(cluster, a, 3 * GIB)
    asked = answer_evictions(a.links[a_replica], a, 3 * GIB)

    request = b.run("y = f(x)")
    await evictions_done()
    assert asked == [{"devices": [0], "reason": "kernel b needs GPU 0"}]
    [replica] = b.links
    assert b.sent_to(request) == replica  # it ran once GPU 0 was free
    meta = orjson.loads(b.links[replica].sent[-1].metadata)["nbcluster"]
    assert meta["gpus"] == [0]
    lines = [t for t in b.streams() if "to be freed" in t]
    assert len(lines) == 1
    assert lines[0].startswith("[nbcluster] waited ")
    assert lines[0].endswith("s for GPU 0 to be freed by another kernel (3.0 GB moved)\n")
    assert a.streams() == []  # the kernel whose memory moved is not told in a cell
    [device] = cluster.scheduling.device_memory("h1")
    assert device.held == ()


async def test_a_replica_that_does_not_answer_gets_the_waiting_cell_refused() -> None:
    cluster = Cluster()
    with_evictor(cluster, timeout=0.05)
    cluster.add_host("h1", gpus=1)
    a, b = cluster.add_kernel("a"), cluster.add_kernel("b")
    leave_memory_on_gpu_0(cluster, a, GIB)  # a's link never answers

    request = b.run("y = f(x)")
    await evictions_done()
    assert b.executed() == []
    [reply] = b.replies(request)
    assert reply["ename"] == "GpuUnavailable"
    assert "still held by kernel a" in reply["evalue"] and "no answer in 0.05 s" in reply["evalue"]
    assert cluster.committed() == 0 and cluster.scheduling.parked == ()


async def test_a_reply_without_device_memory_changes_nothing_known() -> None:
    cluster = Cluster()
    with_evictor(cluster)
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("a")
    replica = leave_memory_on_gpu_0(cluster, a, GIB)
    # A later cell's reply says nothing of device memory (no GPU framework imported there,
    # or a malformed block): what was known stays.
    for extra in ({}, {"nbcluster": {"device_memory": {"held": {"zero": 1}}}}):
        request = a.run("print(1)")
        a.reply(request, **extra)
    [device] = cluster.scheduling.device_memory("h1")
    assert dict(device.held) == {(a.id, replica): GIB}
    # And a report of nothing held clears it.
    request = a.run("del model")
    a.reply(request, nbcluster={"device_memory": {"held": {}}})
    [device] = cluster.scheduling.device_memory("h1")
    assert device.held == ()
