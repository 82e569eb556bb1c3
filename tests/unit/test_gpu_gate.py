"""The scheduler driver as every kernel's gate: the pure scheduler's decisions carried out on
real GatewayKernels whose replica links and websocket clients are fakes that record what they
are given."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from nbcluster.gateway import GatewayKernel, KernelRecord, ReplicaRecord
from nbcluster.gateway._driver import Placement, SchedulerDriver, host_spec, new_replica_id
from nbcluster.gateway._metrics import GatewayMetrics
from nbcluster.hostproto import ConnectionInfo, GpuInfo, HostResources
from nbcluster.protocol import Message, new_message
from nbcluster.scheduling import (
    HostAdded,
    KernelStopped,
    KernelView,
    Migrate,
    ReplicaStopped,
    Resources,
    ScaleIn,
    ScaleOut,
)

from .fakes import FakeClient, FakeLink

CONNECTION = ConnectionInfo(
    ip="127.0.0.1", shell_port=1, iopub_port=2, stdin_port=3, control_port=4, hb_port=5
)


@dataclass
class Kern:
    """One kernel of the fake cluster: the real kernel, its fake links and its one client."""

    kernel: GatewayKernel
    links: dict[str, FakeLink]
    client: FakeClient

    @property
    def id(self) -> str:
        return self.kernel.id

    def run(self, code: str = "x = 1", **content: Any) -> Message:
        """A client sends a cell; returns the request."""
        request = new_message(
            "shell", "execute_request", {"code": code, "silent": False, **content}, session="c"
        )
        self.kernel.handle_client_message(self.client, request)
        return request

    def executed(self) -> list[tuple[str, str]]:
        """``(replica_id, msg_id)`` of every execute request a replica was sent."""
        return [
            (rid, m.msg_id)
            for rid, link in self.links.items()
            for m in link.sent
            if m.msg_type == "execute_request"
        ]

    def sent_to(self, request: Message) -> str:
        [replica] = [rid for rid, msg_id in self.executed() if msg_id == request.msg_id]
        return replica

    def reply(self, request: Message, status: str = "ok", **content: Any) -> None:
        """The replica that was sent ``request`` answers it."""
        link = self.links[self.sent_to(request)]
        body: dict[str, Any] = {"status": status, "execution_count": 1, **content}
        if status == "error":
            body.setdefault("ename", "ZeroDivisionError")
            body.setdefault("evalue", "division by zero")
            body.setdefault("traceback", [])
        reply = new_message("shell", "execute_reply", body, parent=request)
        self.kernel.on_replica_message(link, reply)  # type: ignore[arg-type]

    def replies(self, request: Message) -> list[dict[str, Any]]:
        """Contents of the execute replies the client got for ``request``."""
        return [
            m.content_dict
            for m in self.client.sent
            if m.msg_type == "execute_reply" and m.parent_msg_id == request.msg_id
        ]

    def streams(self) -> list[str]:
        return [m.content_dict["text"] for m in self.client.sent if m.msg_type == "stream"]


class FakeMover:
    """Stands in for the kernel manager's ``move_replica``; a test sets ``move``."""

    def __init__(self) -> None:
        self.move: Callable[[Migrate], Awaitable[bool]] | None = None

    async def move_replica(self, migrate: Migrate) -> bool:
        return False if self.move is None else await self.move(migrate)


class FakeHosts:
    """Stands in for the auto-scaler: records what it is asked."""

    def __init__(self) -> None:
        self.asked: list[ScaleOut] = []
        self.released: list[ScaleIn] = []

    def request_hosts(self, action: ScaleOut) -> None:
        self.asked.append(action)

    def release_hosts(self, action: ScaleIn) -> None:
        self.released.append(action)


class Cluster:
    """A scheduler driver with hosts and kernels, as the kernel manager would set it up."""

    def __init__(self, replicas_per_kernel: int = 3) -> None:
        self.kernels: dict[str, GatewayKernel] = {}
        self.metrics = GatewayMetrics()
        self.mover = FakeMover()
        self.hosts = FakeHosts()
        self.scheduling = SchedulerDriver(
            self.kernels,
            self.metrics,
            max_subscription_ratio=7.0,
            replicas_per_kernel=replicas_per_kernel,
            mover=self.mover,
            hosts=self.hosts,
        )

    def add_host(self, name: str, gpus: int = 1, devices: tuple[int, ...] = ()) -> None:
        spec = Resources(gpus=gpus, millicpus=8000, memory_mb=16384, vram_gb=16.0 * max(gpus, 1))
        self.scheduling.handle(HostAdded(name, spec, devices))

    def add_kernel(
        self, kernel_id: str, gpus: int = 1, replicas: int = 1, policy: str = "batch"
    ) -> Kern:
        request = Resources(gpus=gpus, millicpus=1000, memory_mb=1024)
        place = self.scheduling.place_kernel(kernel_id, request, replicas, policy)
        assert isinstance(place, Placement), place
        record = KernelRecord(
            id=kernel_id,
            name="python3",
            key="secret",
            policy=policy,
            replica_count=len(place.replicas),
            replicas=[
                ReplicaRecord(replica_id=rid, host=host, state="running", connection=CONNECTION)
                for rid, host in place.replicas
            ],
        )
        kernel = GatewayKernel(record, gate=self.scheduling)
        links = {rid: FakeLink(rid) for rid, _ in place.replicas}
        kernel.links.update(links)  # type: ignore[arg-type]
        kernel.executor_link()  # the first placed replica
        assert kernel.executor == place.replicas[0][0]
        kernel.started()
        self.kernels[kernel_id] = kernel
        client = FakeClient(kernel_id)
        kernel.attach(client)
        return Kern(kernel, links, client)

    def committed(self) -> int:
        return self.scheduling.summary().committed_gpus

    def kernel(self, kernel_id: str) -> KernelView:
        view = self.scheduling.kernel_view(kernel_id)
        assert view is not None, f"the scheduler has no kernel {kernel_id}"
        return view

    def sample(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value


def nbcluster_meta(msg: Message) -> dict[str, Any]:
    meta: dict[str, Any] = orjson.loads(msg.metadata).get("nbcluster", {})
    return meta


def only_request(link: FakeLink) -> Message:
    [msg] = [m for m in link.sent if m.msg_type == "execute_request"]
    return msg


# -- dispatch -----------------------------------------------------------------------------------


def test_a_cell_goes_to_its_bound_replica_with_the_bound_devices() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=2, devices=(3, 7))
    k = cluster.add_kernel("k1", gpus=1)
    request = k.run()
    [rid] = k.links
    sent = only_request(k.links[rid])
    assert sent.msg_id == request.msg_id
    # a single replica: no term/attempt, only the devices
    assert nbcluster_meta(sent) == {"gpus": [3]}
    assert k.client.sent == []  # nothing to say: it runs at once
    binding = cluster.kernel("k1").binding
    assert binding is not None and (binding.term, binding.device_indices) == (1, (3,))
    assert cluster.committed() == 1
    k.reply(request)
    assert [r["status"] for r in k.replies(request)] == ["ok"]
    assert cluster.committed() == 0


def test_on_a_replicated_kernel_the_cell_carries_its_term_attempt_and_devices() -> None:
    cluster = Cluster()
    for name in ("h1", "h2", "h3"):
        cluster.add_host(name, gpus=1)
    k = cluster.add_kernel("k1", gpus=1, replicas=3, policy="notebookos")
    assert len(k.links) == 3
    executor = k.kernel.executor
    first = k.run("a = 1")
    assert k.sent_to(first) == executor
    assert executor is not None
    assert nbcluster_meta(only_request(k.links[executor])) == {
        "term": 1,
        "attempt": 1,
        "after_term": 0,
        "gpus": [0],
    }
    assert len(k.executed()) == 1  # the standby replicas get nothing
    k.reply(first)
    second = k.run("a + 1")
    sent = next(m for m in k.links[k.sent_to(second)].sent if m.msg_id == second.msg_id)
    assert nbcluster_meta(sent) == {"term": 2, "attempt": 1, "after_term": 1, "gpus": [0]}


def test_a_kernel_without_gpus_runs_at_once_when_every_gpu_is_bound() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    busy = cluster.add_kernel("busy", gpus=1)
    busy.run()
    assert cluster.committed() == 1
    cpu = cluster.add_kernel("cpu", gpus=0)
    first, second = cpu.run("a = 1"), cpu.run("a + 1")
    # both reach the replica at once (its own queue orders them), with no GPU
    assert [msg_id for _, msg_id in cpu.executed()] == [first.msg_id, second.msg_id]
    assert nbcluster_meta(only_request_of(cpu, first)) == {"gpus": []}
    assert cpu.streams() == []
    assert cluster.scheduling.waiting == ()
    cpu.reply(first)
    cpu.reply(second)
    assert cluster.committed() == 1  # still the other kernel's


def only_request_of(k: Kern, request: Message) -> Message:
    link = k.links[k.sent_to(request)]
    return next(m for m in link.sent if m.msg_id == request.msg_id)


def test_a_reserved_kernel_runs_every_cell_on_its_life_long_devices() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=2, devices=(0, 1))
    k = cluster.add_kernel("k1", gpus=1, policy="reservation")
    assert cluster.committed() == 1  # bound at placement
    first = k.run()
    assert nbcluster_meta(only_request_of(k, first)) == {"gpus": [0]}
    k.reply(first)
    assert cluster.committed() == 1  # the reservation outlives the cell
    second = k.run()
    assert nbcluster_meta(only_request_of(k, second)) == {"gpus": [0]}


# -- waiting for GPUs ---------------------------------------------------------------------------


def test_a_cell_waits_for_a_busy_gpu_and_runs_once_it_is_released() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("ka", gpus=1)
    b = cluster.add_kernel("kb", gpus=1)
    first = a.run()
    assert len(a.executed()) == 1
    waiting = b.run()
    assert b.executed() == []  # not sent: no GPU
    assert b.kernel.waiting_terms() == [1]
    assert cluster.scheduling.waiting == (("kb", 1),)
    # the user sees the cell busy and a message that says what it waits for and why
    assert [(m.msg_type, m.parent_msg_id) for m in b.client.sent] == [
        ("status", waiting.msg_id),
        ("stream", waiting.msg_id),
    ]
    assert b.client.sent[0].content_dict["execution_state"] == "busy"
    stream = b.client.sent[1].content_dict
    assert stream["name"] == "stderr"
    assert "Waiting for 1 GPU:" in stream["text"]
    assert "no host has 1 idle GPUs" in stream["text"]
    assert "1 of 1 GPUs in the cluster are in use" in stream["text"]
    assert cluster.sample("nbcluster_cells_waited_for_gpus_total") == 1
    assert cluster.sample("nbcluster_gpu_wait_seconds_count") == 0
    assert a.client.sent == []  # the other kernel's users hear nothing of it

    a.reply(first)
    assert [msg_id for _, msg_id in b.executed()] == [waiting.msg_id]
    assert nbcluster_meta(only_request_of(b, waiting)) == {"gpus": [0]}
    assert "Got 1 GPU (0) on h1 after" in b.streams()[-1]
    assert b.kernel.waiting_terms() == []
    assert not cluster.scheduling.waiting
    assert cluster.committed() == 1
    assert cluster.sample("nbcluster_gpu_wait_seconds_count") == 1
    b.reply(waiting)
    assert cluster.committed() == 0
    assert [r["status"] for r in b.replies(waiting)] == ["ok"]
    assert cluster.sample("nbcluster_gpu_wait_seconds_count") == 1  # observed once only


def test_a_cell_queued_behind_its_own_kernels_cell_is_not_announced() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=2)
    k = cluster.add_kernel("k1", gpus=1)
    first, second = k.run("a = 1"), k.run("a + 1")
    assert [msg_id for _, msg_id in k.executed()] == [first.msg_id]
    assert k.client.sent == []  # an ordinary queued cell, as on any Jupyter kernel
    assert cluster.sample("nbcluster_cells_waited_for_gpus_total") == 0
    k.reply(first)
    assert [msg_id for _, msg_id in k.executed()] == [first.msg_id, second.msg_id]
    assert k.streams() == []  # it never announced a wait, so no "got" message either


def test_a_cell_that_finds_no_gpu_asks_the_auto_scaler_for_a_host() -> None:
    """Only a kernel that can move to a new host asks for one (a policy that migrates, and a
    peer to catch up from): ``docs/scheduling.md``, "Auto-scaling"."""
    cluster = Cluster()
    asked = cluster.hosts.asked
    cluster.add_host("h1", gpus=1)
    cluster.add_host("h2", gpus=1)
    a = cluster.add_kernel("ka", gpus=1, replicas=2, policy="notebookos")
    c = cluster.add_kernel("kc", gpus=1, replicas=2, policy="notebookos")
    b = cluster.add_kernel("kb", gpus=1, replicas=2, policy="notebookos")
    a.run()
    c.run()
    assert asked == []
    b.run()
    assert len(asked) == 1 and asked[0].count == 1
    assert "kb" in asked[0].reason


def test_a_lone_batch_replica_that_finds_no_gpu_asks_for_no_host() -> None:
    cluster = Cluster()
    asked = cluster.hosts.asked
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("ka", gpus=1)
    b = cluster.add_kernel("kb", gpus=1)
    a.run()
    b.run()
    assert asked == []  # a new host could not run kb's cell: kb cannot move there


# -- interrupts ---------------------------------------------------------------------------------


def _two_kernels_one_gpu() -> tuple[Cluster, Kern, Kern, Message, Message]:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("ka", gpus=1)
    b = cluster.add_kernel("kb", gpus=1)
    running = a.run()
    waiting = b.run()
    assert b.executed() == [] and cluster.scheduling.waiting == (("kb", 1),)
    return cluster, a, b, running, waiting


def _assert_interrupted(b: Kern, waiting: Message) -> None:
    assert b.client.sent[0].content_dict["execution_state"] == "busy"
    after_wait = [m for m in b.client.sent if m.msg_type not in ("stream",)][1:]  # skip busy
    assert [(m.channel, m.msg_type) for m in after_wait] == [
        ("iopub", "error"),
        ("shell", "execute_reply"),
        ("iopub", "status"),
    ]
    reply = after_wait[1].content_dict
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert "waiting for GPUs" in reply["evalue"]
    assert after_wait[2].content_dict["execution_state"] == "idle"
    assert all(m.parent_msg_id == waiting.msg_id for m in after_wait)


def test_interrupting_a_waiting_cell_as_the_manager_does_answers_it_and_empties_the_queue() -> None:
    cluster, a, b, running, waiting = _two_kernels_one_gpu()
    # KernelManager.interrupt_kernel
    for term in b.kernel.waiting_terms():
        b.kernel.cancel_waiting(term, "KeyboardInterrupt", "interrupted while waiting for GPUs")
        cluster.scheduling.execution_cancelled(b.kernel, term)
    _assert_interrupted(b, waiting)
    assert cluster.scheduling.waiting == ()
    assert cluster.kernel("kb").waiting == ()
    assert b.kernel.waiting_terms() == [] and len(b.kernel.pending) == 0
    assert cluster.sample("nbcluster_gpu_wait_seconds_count") == 1  # the wait ended
    # the freed GPU does not resurrect the interrupted cell
    a.reply(running)
    assert b.executed() == []
    assert cluster.committed() == 0


def test_cancelling_through_the_gate_alone_answers_the_waiting_cell() -> None:
    cluster, _a, b, _running, waiting = _two_kernels_one_gpu()
    cluster.scheduling.execution_cancelled(b.kernel, 1)
    _assert_interrupted(b, waiting)
    assert cluster.scheduling.waiting == ()
    assert b.kernel.waiting_terms() == []


def test_interrupting_a_running_cell_keeps_its_gpus_until_its_reply() -> None:
    cluster, a, b, running, waiting = _two_kernels_one_gpu()
    cluster.scheduling.execution_cancelled(a.kernel, 1)
    assert cluster.committed() == 1
    assert a.replies(running) == []  # the replica answers it, not the gateway
    a.reply(running, "error", ename="KeyboardInterrupt")
    assert cluster.committed() == 1  # now the waiting cell's
    assert [msg_id for _, msg_id in b.executed()] == [waiting.msg_id]


# -- failed cells -------------------------------------------------------------------------------


def _contended() -> tuple[Cluster, Kern, Kern, list[Message], Message]:
    """ka runs cell 1 on the only GPU; kb's cell waits for it, then ka's cells 2 and 3."""
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("ka", gpus=1)
    b = cluster.add_kernel("kb", gpus=1)
    first = a.run("1 / 0")
    other = b.run()
    second, third = a.run("a = 2"), a.run("a = 3")
    assert a.kernel.waiting_terms() == [2, 3]
    assert cluster.scheduling.waiting == (("kb", 1), ("ka", 2), ("ka", 3))
    return cluster, a, b, [first, second, third], other


def test_a_failed_cell_aborts_the_cells_of_its_kernel_that_wait_behind_it() -> None:
    cluster, a, b, (first, second, third), other = _contended()
    a.reply(first, "error")
    assert [r["status"] for r in a.replies(first)] == ["error"]
    for aborted in (second, third):
        [reply] = a.replies(aborted)
        assert reply["ename"] == "ExecutionAborted"
        assert "a cell before this one failed" in reply["evalue"]
    assert [msg_id for _, msg_id in a.executed()] == [first.msg_id]
    assert a.kernel.waiting_terms() == []
    assert cluster.kernel("ka").waiting == ()
    # the other kernel's cell got the GPU (it had waited longest)
    assert cluster.scheduling.waiting == ()
    assert [msg_id for _, msg_id in b.executed()] == [other.msg_id]
    b.reply(other)
    assert cluster.committed() == 0
    assert a.executed() == [(a.sent_to(first), first.msg_id)]  # nothing else ever ran


def test_a_failed_cell_with_stop_on_error_false_lets_the_next_cells_wait_and_run() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    a = cluster.add_kernel("ka", gpus=1)
    b = cluster.add_kernel("kb", gpus=1)
    first = a.run("1 / 0", stop_on_error=False)
    other = b.run()
    second = a.run("a = 2")
    a.reply(first, "error")
    assert a.replies(second) == []  # not aborted
    assert a.kernel.waiting_terms() == [2]
    assert cluster.scheduling.waiting == (("ka", 2),)
    b.reply(other)
    assert [msg_id for _, msg_id in a.executed()] == [first.msg_id, second.msg_id]


def test_a_successful_cell_aborts_nothing() -> None:
    _cluster, a, b, (first, second, third), other = _contended()
    a.reply(first)
    assert a.replies(second) == [] and a.replies(third) == []
    assert a.kernel.waiting_terms() == [2, 3]
    b.reply(other)
    assert [msg_id for _, msg_id in a.executed()] == [first.msg_id, second.msg_id]


def test_a_failed_cell_aborts_the_next_cell_even_when_its_own_gpus_free_up() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    k = cluster.add_kernel("k1", gpus=1)
    first, second = k.run("1 / 0"), k.run("a = 2")
    assert k.kernel.waiting_terms() == [2]
    k.reply(first, "error")
    assert [msg_id for _, msg_id in k.executed()] == [first.msg_id]
    [reply] = k.replies(second)
    assert reply["ename"] == "ExecutionAborted"


# -- kernel death and replica loss -------------------------------------------------------------


def test_fail_pending_releases_the_binding_and_hands_the_gpu_on() -> None:
    cluster, a, b, running, waiting = _two_kernels_one_gpu()
    assert cluster.committed() == 1
    a.kernel.fail_pending("KernelDied", "the kernel died: boom")
    [reply] = a.replies(running)
    assert reply["ename"] == "KernelDied"
    assert cluster.kernel("ka").binding is None
    # the waiting cell of the other kernel got the GPU
    assert [msg_id for _, msg_id in b.executed()] == [waiting.msg_id]
    b.reply(waiting)
    assert cluster.committed() == 0


def test_fail_pending_releases_the_binding_of_a_lone_kernel() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    k = cluster.add_kernel("k1", gpus=1)
    running = k.run()
    assert cluster.committed() == 1
    k.kernel.mark_dead("its host was lost")
    assert cluster.committed() == 0
    assert k.replies(running)[0]["ename"] == "KernelDied"


def test_fail_pending_takes_a_waiting_cell_out_of_the_queue() -> None:
    cluster, a, b, running, waiting = _two_kernels_one_gpu()
    b.kernel.fail_pending("KernelDied", "the kernel died: boom")
    [reply] = b.replies(waiting)
    assert reply["ename"] == "KernelDied"  # answered once, not again as interrupted
    assert cluster.scheduling.waiting == ()
    a.reply(running)
    assert b.executed() == []
    assert cluster.committed() == 0


def test_fail_pending_sends_no_waiting_cell_of_the_same_kernel_to_a_replica() -> None:
    cluster = Cluster()
    cluster.add_host("h1", gpus=1)
    k = cluster.add_kernel("k1", gpus=1)
    first, second = k.run("a = 1"), k.run("a + 1")
    k.kernel.fail_pending("KernelRestarted", "the kernel was restarted")
    assert k.replies(second)[0]["ename"] == "KernelRestarted"
    assert cluster.committed() == 0
    assert [msg_id for _, msg_id in k.executed()] == [first.msg_id]
    assert len(k.kernel.pending) == 0


def test_stopping_a_kernel_frees_its_claims_and_runs_the_next_waiting_cell() -> None:
    cluster, a, b, _running, waiting = _two_kernels_one_gpu()
    a.kernel.fail_pending("KernelShutdown", "the kernel was shut down")
    cluster.scheduling.handle(KernelStopped("ka"))
    assert cluster.scheduling.kernel_view("ka") is None
    assert [msg_id for _, msg_id in b.executed()] == [waiting.msg_id]


def _replicated(hosts: int = 3, gpus_per_host: int = 1) -> tuple[Cluster, Kern]:
    cluster = Cluster()
    for n in range(1, hosts + 1):
        cluster.add_host(f"h{n}", gpus=gpus_per_host)
    k = cluster.add_kernel("k1", gpus=1, replicas=3, policy="notebookos")
    return cluster, k


def test_a_cell_of_a_lost_replica_runs_again_on_another_with_gpus() -> None:
    cluster, k = _replicated()
    request = k.run()
    lost = k.sent_to(request)
    # KernelManager._replica_lost
    k.kernel.drop_link(lost)
    # As the manager does: the scheduler hears of it once the cell is marked to run again.
    k.kernel.on_replica_lost(
        lost,
        "host h1 was lost",
        release=lambda: cluster.scheduling.handle(ReplicaStopped("k1", lost)),
    )
    retried = [(rid, m) for rid, link in k.links.items() if rid != lost for m in link.sent]
    assert len(retried) == 1
    rid, msg = retried[0]
    assert msg.msg_id == request.msg_id
    meta = nbcluster_meta(msg)
    assert (meta["term"], meta["attempt"], meta["gpus"]) == (1, 2, [0])
    binding = cluster.kernel("k1").binding
    assert binding is not None and binding.replica_id == rid
    reply = new_message("shell", "execute_reply", {"status": "ok"}, parent=request)
    k.kernel.on_replica_message(k.links[rid], reply)  # type: ignore[arg-type]
    assert [r["status"] for r in k.replies(request)] == ["ok"]
    assert cluster.committed() == 0


def test_a_cell_rerun_after_its_replica_was_lost_keeps_its_place_before_later_cells() -> None:
    cluster, k = _replicated()
    first, second = k.run("a = 1"), k.run("a + 1")
    lost = k.sent_to(first)
    k.kernel.drop_link(lost)
    # As the manager does: the scheduler hears of it once the cell is marked to run again.
    k.kernel.on_replica_lost(
        lost,
        "host h1 was lost",
        release=lambda: cluster.scheduling.handle(ReplicaStopped("k1", lost)),
    )
    survivors = {rid: link for rid, link in k.links.items() if rid != lost}
    sent = [m.msg_id for link in survivors.values() for m in link.sent]
    assert sent == [first.msg_id]  # term 2 waits until term 1 has run
    [rid] = [rid for rid, link in survivors.items() if link.sent]
    reply = new_message("shell", "execute_reply", {"status": "ok"}, parent=first)
    k.kernel.on_replica_message(survivors[rid], reply)  # type: ignore[arg-type]
    sent = [m.msg_id for link in survivors.values() for m in link.sent]
    assert sent == [first.msg_id, second.msg_id]


# -- migration ----------------------------------------------------------------------------------


def _crowded() -> tuple[Cluster, Kern]:
    """k1's three replicas' hosts have their only GPU bound to other kernels; h4 is free."""
    cluster, k = _replicated()
    for name in ("o1", "o2", "o3"):
        other = cluster.add_kernel(name, gpus=1)
        other.run()
    busy = {v.name for v in cluster.scheduling.host_views().values() if v.bound}
    assert busy == {"h1", "h2", "h3"} and cluster.committed() == 3
    cluster.add_host("h4", gpus=1)
    return cluster, k


async def test_a_cell_whose_hosts_are_busy_runs_on_a_migrated_replica() -> None:
    cluster, k = _crowded()
    migrations: list[Migrate] = []

    async def migrate(action: Migrate) -> bool:
        migrations.append(action)
        await asyncio.sleep(0)
        k.links[action.new_replica_id] = FakeLink(action.new_replica_id)
        k.kernel.links[action.new_replica_id] = k.links[action.new_replica_id]  # type: ignore[assignment]
        return True

    cluster.mover.move = migrate
    request = k.run()
    assert k.executed() == []  # not before the new replica has caught up
    await _until(lambda: bool(k.executed()))
    [action] = migrations
    assert action.to_host == "h4"
    assert k.executed() == [(action.new_replica_id, request.msg_id)]
    assert nbcluster_meta(only_request_of(k, request))["gpus"] == [0]
    assert (
        cluster.metrics.registry.get_sample_value("nbcluster_migrations_total", {"outcome": "ok"})
        == 1
    )


async def test_a_cell_whose_migrations_keep_failing_is_answered_gpu_unavailable() -> None:
    cluster, k = _crowded()
    attempts: list[Migrate] = []

    async def migrate(action: Migrate) -> bool:
        attempts.append(action)
        # as the manager does when the new replica fails to start
        cluster.scheduling.handle(ReplicaStopped(action.kernel_id, action.new_replica_id))
        return False

    cluster.mover.move = migrate
    request = k.run()
    await _until(lambda: bool(k.replies(request)))
    assert len(attempts) == 2
    [reply] = k.replies(request)
    assert reply["ename"] == "GpuUnavailable"
    assert "failed 2 times" in reply["evalue"]
    assert k.executed() == []
    assert (
        cluster.metrics.registry.get_sample_value(
            "nbcluster_migrations_total", {"outcome": "failed"}
        )
        == 2
    )
    assert cluster.kernel("k1").binding is None
    assert cluster.scheduling.waiting == ()
    await cluster.scheduling.close()


async def _until(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition not met in time")


# -- helpers ------------------------------------------------------------------------------------


def test_new_replica_id_is_unique_and_names_its_kernel() -> None:
    ids = {new_replica_id("0123456789abcdef", 1) for _ in range(200)}
    assert len(ids) == 200  # the same number never repeats an id (restarts)
    assert all(i.startswith("01234567-") for i in ids)
    assert new_replica_id("k", 1) != new_replica_id("k", 2)


def test_host_spec_converts_reported_resources() -> None:
    resources = HostResources(
        cpus=8,
        memory_mb=16384,
        gpus=[
            GpuInfo(index=5, uuid="GPU-b", name="H100", memory_mb=2048, virtual=False),
            GpuInfo(index=2, uuid="GPU-a", name="H100", memory_mb=1024, virtual=False),
        ],
    )
    spec, devices = host_spec(resources)
    assert spec == Resources(gpus=2, millicpus=8000, memory_mb=16384, vram_gb=3.0)
    assert devices == (5, 2)
    # what the scheduler accepts and binds from
    cluster = Cluster()
    cluster.scheduling.handle(HostAdded("h1", spec, devices))
    assert cluster.scheduling.host_views()["h1"].gpu_devices == (2, 5)
    k = cluster.add_kernel("k1", gpus=1)
    request = k.run()
    assert nbcluster_meta(only_request_of(k, request)) == {"gpus": [2]}


def test_host_spec_of_a_host_without_gpus() -> None:
    spec, devices = host_spec(HostResources(cpus=2, memory_mb=512))
    assert spec == Resources(gpus=0, millicpus=2000, memory_mb=512, vram_gb=0.0)
    assert devices == ()
