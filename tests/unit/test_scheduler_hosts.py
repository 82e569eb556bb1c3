"""Kernels confined to named hosts (a kernelspec's ``remote_hosts``) in the pure scheduler:
placed, replaced, moved and bound only there; when too few of them run, the scale-out it asks
for names them; hosts that have not registered yet do not make the kernel "too big". The
random-sequence property is ``PoolMachine`` in ``test_scheduler_pools.py``."""

from __future__ import annotations

from nbcluster.scheduling import (
    Action,
    ExecutionRequested,
    HostAdded,
    KernelAdopted,
    KernelRequested,
    MigrationRefused,
    MigrationRequested,
    PlaceReplicas,
    RejectKernel,
    ReplicaAdopted,
    ReplicaRequested,
    ReplicaStopped,
    Resources,
    ScaleOut,
    Scheduler,
    WaitForGpus,
)

HOST = Resources(gpus=1, millicpus=64_000, memory_mb=128_000, vram_gb=40.0)
CPU = Resources(gpus=0, millicpus=1000, memory_mb=1024)
ONE_GPU = Resources(gpus=1, millicpus=1000, memory_mb=1024)
MACHINES = frozenset({"ssh-gpu1", "ssh-gpu2", "ssh-gpu3"})


def cluster(*names: str, pool: str | None = None) -> Scheduler:
    s = Scheduler()
    for name in names:
        assert s.handle(HostAdded(name, HOST, pool=pool)) == []
    return s


def placed_hosts(actions: list[Action]) -> set[str]:
    return {h for a in actions if isinstance(a, PlaceReplicas) for _, h in a.replicas}


def test_a_confined_kernel_is_placed_only_on_its_hosts() -> None:
    s = cluster("local-1", "local-2", "ssh-gpu1", "ssh-gpu2", "ssh-gpu3")
    actions = s.handle(KernelRequested("k", CPU, 3, hosts=MACHINES))
    assert placed_hosts(actions) == set(MACHINES)
    assert s.kernels["k"].hosts == MACHINES


def test_too_few_of_its_hosts_scale_out_among_them() -> None:
    s = cluster("local-1", "local-2", "local-3", "ssh-gpu1")
    actions = s.handle(KernelRequested("k", CPU, 3, hosts=MACHINES))
    reject, scale = actions
    assert isinstance(reject, RejectKernel) and reject.full
    assert reject.reason.startswith("3 replicas need 3 hosts among hosts ssh-gpu1, ssh-gpu2, ")
    assert reject.reason.endswith("; 1 have room")
    assert scale == ScaleOut(2, reject.reason, MACHINES)
    assert "k" not in s.kernels


def test_an_empty_cluster_scales_out_among_the_kernels_hosts() -> None:
    actions = Scheduler().handle(KernelRequested("k", CPU, 3, hosts=MACHINES))
    assert actions[1] == ScaleOut(3, "the cluster has no hosts", MACHINES)


def test_hosts_that_have_not_registered_are_not_judged_too_small() -> None:
    # Only a 1-GPU host is here; the kernel's own hosts may be bigger when they come.
    s = cluster("local-1")
    big = Resources(gpus=4, millicpus=1000, memory_mb=1024)
    actions = s.handle(KernelRequested("k", big, 3, hosts=MACHINES))
    assert isinstance(actions[0], RejectKernel) and actions[0].full
    assert isinstance(actions[1], ScaleOut) and actions[1].among == MACHINES


def test_too_big_is_judged_on_its_registered_hosts() -> None:
    s = cluster("ssh-gpu1")
    big = Resources(gpus=4, millicpus=1000, memory_mb=1024)
    (reject,) = s.handle(KernelRequested("k", big, 1, hosts=MACHINES))
    assert reject == RejectKernel(
        "k", "requests 4 GPUs; the largest host among hosts ssh-gpu1, ssh-gpu2, ssh-gpu3 has 1"
    )


def test_a_pooled_and_confined_kernel_asks_for_no_scale_out() -> None:
    s = cluster("ssh-gpu1", pool="a100")
    actions = s.handle(KernelRequested("k", CPU, 3, pool="a100", hosts=MACHINES))
    assert [type(a) for a in actions] == [RejectKernel]
    assert "in pool 'a100' among hosts" in actions[0].reason  # type: ignore[union-attr]


def test_a_replacement_stays_on_its_hosts_and_scales_out_among_them() -> None:
    s = cluster("local-1", "ssh-gpu1", "ssh-gpu2")
    s.handle(KernelRequested("k", CPU, 2, hosts=MACHINES))
    (rid, _), *_ = s.kernels["k"].replicas
    s.handle(ReplicaStopped("k", rid))
    # The stopped replica's host is free again: the replacement goes there, not to local-1.
    assert placed_hosts(s.handle(ReplicaRequested("k"))) <= MACHINES
    s.handle(HostAdded("ssh-gpu3", HOST))
    assert placed_hosts(s.handle(ReplicaRequested("k"))) == {"ssh-gpu3"}


def test_a_replacement_with_none_of_its_hosts_free_scales_out_among_them() -> None:
    s = cluster("local-1", "local-2", "ssh-gpu1", "ssh-gpu2")
    s.handle(KernelRequested("k", CPU, 2, hosts=MACHINES))
    assert s.handle(ReplicaRequested("k")) == [
        ScaleOut(
            1,
            "no host among hosts ssh-gpu1, ssh-gpu2, ssh-gpu3 has room for a replica of k",
            MACHINES,
        )
    ]


def test_explicit_migration_off_its_hosts_is_refused() -> None:
    s = cluster("local-1", "ssh-gpu1", "ssh-gpu2", "ssh-gpu3")
    s.handle(KernelRequested("k", CPU, 2, hosts=MACHINES))
    rid, _ = s.kernels["k"].replicas[0]
    (refused,) = s.handle(MigrationRequested("k", rid, "local-1"))
    assert refused == MigrationRefused(
        "k", rid, "kernel k runs only on hosts ssh-gpu1, ssh-gpu2, ssh-gpu3, not on local-1"
    )


def test_a_waiting_cell_of_a_confined_kernel_asks_for_its_hosts() -> None:
    s = cluster("ssh-gpu1", "ssh-gpu2")
    s.handle(KernelRequested("a", ONE_GPU, 1, hosts=MACHINES))
    s.handle(KernelRequested("b", ONE_GPU, 1, hosts=MACHINES))
    # Two replicas: a new host would let k's cell run there by a migration.
    s.handle(KernelRequested("k", ONE_GPU, 2, hosts=MACHINES))
    s.handle(ExecutionRequested("a", 1, None))  # takes the GPU of one host
    s.handle(ExecutionRequested("b", 1, None))  # and of the other
    actions = s.handle(ExecutionRequested("k", 1, None))
    assert isinstance(actions[0], WaitForGpus)
    assert actions[1] == ScaleOut(1, "a cell of k waits for 1 GPUs", MACHINES)
    # A lone replica waits for its own host: a new host would not help it.
    s.handle(KernelRequested("c", ONE_GPU, 1, hosts=MACHINES))
    assert [type(a) for a in s.handle(ExecutionRequested("c", 1, None))] == [WaitForGpus]


def test_adopted_kernels_keep_their_hosts() -> None:
    s = cluster("local-1", "ssh-gpu1")
    s.handle(KernelAdopted("k", CPU, hosts=MACHINES))
    assert s.kernels["k"].hosts == MACHINES
    s.handle(ReplicaAdopted("j", "r1", "ssh-gpu1", CPU, hosts=MACHINES))
    assert s.kernels["j"].hosts == MACHINES
