"""GPU memory follows the binding (``kernel._device_memory``), without a GPU: PyTorch CPU
tensors and a fake device layer that records which "device" each storage is on and every move
between devices, so that values, identities and sharing can be checked after each move."""

from __future__ import annotations

from typing import Any

import pytest

from nbcluster.kernel._cuda import DeviceNumbering
from nbcluster.kernel._device_memory import (
    DeviceBusyError,
    NamespaceDeviceMemory,
    Restore,
    describe_restore,
    find_arrays,
)
from nbcluster.kernel._device_torch import CudaTorchLayer, TorchFramework

torch = pytest.importorskip("torch")


class FakeDevices:
    """A fake device layer: a storage is "on" the device recorded for its address (host memory
    when none is); a copy is a CPU clone recorded on the target device. Every storage it has
    seen is kept alive, so that no address is reused while a test runs."""

    def __init__(self) -> None:
        self.where: dict[int, int | None] = {}
        self.keep: list[Any] = []
        self.moves: list[tuple[int | None, int | None, int]] = []  # (from, to, bytes)
        self.released = 0

    def in_use(self) -> bool:
        return True

    def device_of(self, storage: Any) -> int | None:
        return self.where.get(storage.data_ptr())

    def copy(self, storage: Any, device: int | None) -> Any:
        copy = storage.clone()
        self.keep.append(copy)
        self.where[copy.data_ptr()] = device
        self.moves.append((self.device_of(storage), device, storage.nbytes()))
        return copy

    def release_cached(self) -> None:
        self.released += 1

    def place(self, device: int, *tensors: Any) -> None:
        """Pretend ``tensors`` were allocated on ``device``."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            self.keep.append(storage)
            self.where[storage.data_ptr()] = device

    def device(self, tensor: Any) -> int | None:
        return self.device_of(tensor.untyped_storage())


class Setup:
    def __init__(self, namespace: dict[str, Any], limit: int = 10_000) -> None:
        self.namespace = namespace
        self.devices = FakeDevices()
        self.torch = TorchFramework(torch, self.devices)
        self.memory = NamespaceDeviceMemory(
            lambda: list(namespace.values()), lambda: [self.torch], limit
        )


def trained_pair() -> tuple[Any, Any]:
    """A model and its Adam optimizer after one step: gradients and optimizer state exist."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def device_tensors(model: Any, optimizer: Any) -> list[Any]:
    """Every tensor of the pair that a GPU would hold (Adam keeps ``step`` on the host)."""
    tensors = []
    for p in model.parameters():
        tensors += [p, p.grad]
    for state in optimizer.state.values():
        tensors += [state["exp_avg"], state["exp_avg_sq"]]
    return tensors


def snapshot(tensors: list[Any]) -> list[Any]:
    return [t.detach().clone() for t in tensors]


# -- model and optimizer ------------------------------------------------------------------------


def test_a_model_and_its_optimizer_are_evicted_and_restored_in_place() -> None:
    model, optimizer = trained_pair()
    setup = Setup({"model": model, "opt": optimizer})
    tensors = device_tensors(model, optimizer)
    setup.devices.place(0, *tensors)
    values = snapshot(tensors)
    nbytes = sum(t.untyped_storage().nbytes() for t in tensors)
    assert setup.memory.held() == {0: nbytes}

    evicted = setup.memory.evict([0])
    assert (evicted.freed_bytes, evicted.moved_objects) == (nbytes, len(tensors))
    assert setup.memory.held() == {}
    assert setup.devices.released == 1
    assert all(setup.devices.device(t) is None for t in tensors)
    assert setup.memory.evicted_devices() == (0,)
    # The same objects, with the same values; the optimizer still holds the model's own
    # parameters and keys its state by them.
    assert [id(t) for t in device_tensors(model, optimizer)] == [id(t) for t in tensors]
    params = list(model.parameters())
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    assert all(p in optimizer.state for p in params)
    assert all(torch.equal(a, b) for a, b in zip(tensors, values, strict=True))
    assert {(src, dst) for src, dst, _ in setup.devices.moves} == {(0, None)}

    restored = setup.memory.begin_cell((1,))
    setup.memory.end_cell()
    assert restored is not None
    assert (restored.bytes, restored.objects, restored.devices) == (nbytes, len(tensors), (1,))
    assert setup.memory.held() == {1: nbytes}
    assert all(setup.devices.device(t) == 1 for t in tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, values, strict=True))
    assert setup.memory.evicted_devices() == ()
    # Still one model trained by its optimizer: a step changes the model's weights.
    before = params[0].detach().clone()
    optimizer.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(params[0], before)


def test_a_view_stays_a_view_and_its_storage_moves_once() -> None:
    base = torch.arange(12.0)
    view = base[2:8].view(2, 3)
    setup = Setup({"base": base, "view": view})
    setup.devices.place(0, base)
    assert setup.devices.device(view) == 0
    assert setup.memory.held() == {0: 48}

    assert setup.memory.evict([]).moved_objects == 2
    assert setup.devices.moves == [(0, None, 48)]
    assert view._base is base
    base[3] = 100.0
    assert view[0, 1].item() == 100.0  # they share the host copy

    setup.memory.begin_cell((2,))
    assert setup.devices.moves[-1] == (None, 2, 48)
    assert setup.devices.device(base) == setup.devices.device(view) == 2
    base[4] = -1.0
    assert view[0, 2].item() == -1.0
    assert torch.equal(view, base[2:8].view(2, 3))


def test_a_view_whose_base_has_no_name_brings_the_base_along() -> None:
    base = torch.arange(10.0)
    tail = base[5:]
    setup = Setup({"tail": tail})
    setup.devices.place(0, base)
    del base
    setup.memory.evict([0])
    assert setup.devices.device(tail) is None
    assert setup.devices.device(tail._base) is None  # no copy left on the device
    assert torch.equal(tail, torch.arange(5.0, 10.0))


def test_weights_tied_between_modules_stay_tied() -> None:
    embed = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embed.weight
    setup = Setup({"embed": embed, "head": head, "alias": embed.weight})
    setup.devices.place(0, embed.weight)
    assert setup.memory.evict([0]).freed_bytes == 60
    assert head.weight is embed.weight
    setup.memory.begin_cell((3,))
    assert head.weight is embed.weight and setup.devices.device(head.weight) == 3
    assert [m[:2] for m in setup.devices.moves] == [(0, None), (None, 3)]


def test_a_tensor_with_an_autograd_graph_keeps_it() -> None:
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    setup = Setup({"x": x, "y": y})
    setup.devices.place(0, x, y)
    setup.memory.evict([0])
    assert y.grad_fn is not None and torch.equal(y, torch.full((3,), 2.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


# -- which devices, and where things go ---------------------------------------------------------


def test_only_the_named_devices_are_evicted() -> None:
    a, b, c = torch.ones(4), torch.zeros(8), torch.arange(3.0)
    setup = Setup({"a": a, "b": b, "c": c})
    setup.devices.place(0, a)
    setup.devices.place(1, b)
    assert setup.memory.held() == {0: 16, 1: 32}
    evicted = setup.memory.evict([1])
    assert (evicted.freed_bytes, evicted.moved_objects) == (32, 1)
    assert setup.memory.held() == {0: 16}
    assert setup.devices.device(c) is None  # host memory was never touched
    assert setup.memory.evict([5]).moved_objects == 0  # nothing there


def test_evicting_every_device_spares_the_running_cells_devices() -> None:
    a, b = torch.ones(4), torch.zeros(8)
    setup = Setup({"a": a, "b": b})
    setup.devices.place(0, a)
    setup.devices.place(1, b)
    setup.memory.begin_cell((0,))
    with pytest.raises(DeviceBusyError, match="GPU 0 is bound to the cell running now"):
        setup.memory.evict([0, 1])
    # ... the cell's start moved b onto its device: everything is on 0 now.
    assert setup.memory.held() == {0: 48}
    assert setup.memory.evict([]).moved_objects == 0
    setup.memory.end_cell()
    assert setup.memory.evict([]).moved_objects == 2
    assert setup.memory.held() == {}


def test_a_cell_on_other_devices_gets_the_objects_of_the_devices_it_lacks() -> None:
    t0, t1, t2, t3 = (torch.full((2,), float(i)) for i in range(4))
    setup = Setup({"t0": t0, "t1": t1, "t2": t2, "t3": t3})
    for device, tensor in enumerate((t0, t1, t2, t3)):
        setup.devices.place(device, tensor)
    setup.memory.evict([3])
    restored = setup.memory.begin_cell((1, 5))
    assert restored is not None and restored.devices == (1, 5)
    # 1 keeps its own; 0, 2 and (evicted) 3 go to 1, 5, 1 in order.
    assert [setup.devices.device(t) for t in (t0, t1, t2, t3)] == [1, 1, 5, 1]
    assert [t[0].item() for t in (t0, t1, t2, t3)] == [0.0, 1.0, 2.0, 3.0]


def test_a_cell_without_gpus_moves_nothing_and_host_tensors_stay_home() -> None:
    on_device, at_home = torch.ones(2), torch.zeros(2)
    setup = Setup({"on_device": on_device, "at_home": at_home})
    setup.devices.place(0, on_device)
    assert setup.memory.begin_cell(None) is None
    assert setup.memory.begin_cell(()) is None
    assert setup.memory.begin_cell((0,)) is None  # already where it is bound
    setup.memory.end_cell()
    assert setup.devices.moves == []
    setup.memory.evict([0])
    setup.memory.begin_cell((0,))
    assert setup.devices.device(on_device) == 0 and setup.devices.device(at_home) is None


def test_an_evicted_tensor_that_was_deleted_is_forgotten() -> None:
    namespace: dict[str, Any] = {"t": torch.ones(3)}
    setup = Setup(namespace)
    setup.devices.place(0, namespace["t"])
    setup.memory.evict([0])
    assert setup.memory.evicted_devices() == (0,)
    del namespace["t"]
    assert setup.memory.evicted_devices() == ()
    assert setup.memory.begin_cell((0,)) is None


def test_restore_line() -> None:
    line = describe_restore(Restore(12_400_000_000, 3, 0.94, (1,)))
    assert line == "[nbcluster] moved 12.4 GB of tensors to GPU 1 in 0.9 s\n"
    assert "to GPUs 0, 2" in describe_restore(Restore(2048, 1, 0.0, (0, 2)))


# -- the walk -----------------------------------------------------------------------------------


class Holder:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def test_the_walk_finds_tensors_in_containers_and_objects_once() -> None:
    t = torch.ones(1)
    cyclic: list[Any] = [t]
    cyclic.append(cyclic)
    roots = [
        {"k": (t, {t}), t: "key"},
        Holder(inner=Holder(deep=[torch.zeros(2)])),
        cyclic,
        "text",
        len,
    ]
    framework = TorchFramework(torch, FakeDevices())
    found = [a for _, a in find_arrays(roots, [framework])]
    assert len(found) == 2 and found[0] is t and torch.equal(found[1], torch.zeros(2))


def test_the_walk_is_bounded() -> None:
    chain: Any = torch.ones(1)
    for _ in range(100):
        chain = [chain]
    framework = TorchFramework(torch, FakeDevices())
    assert find_arrays([chain], [framework], limit=50) == []
    assert len(find_arrays([chain], [framework], limit=200)) == 1


def test_a_module_is_not_walked_into() -> None:
    import types

    module = types.ModuleType("m")
    module.weights = torch.ones(2)  # type: ignore[attr-defined]
    framework = TorchFramework(torch, FakeDevices())
    assert find_arrays([module], [framework]) == []


# -- the real layer on a machine without a GPU --------------------------------------------------


def test_the_cuda_layer_without_cuda_holds_nothing() -> None:
    layer = CudaTorchLayer(torch, DeviceNumbering())
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    namespace = {"t": torch.ones(3)}
    memory = NamespaceDeviceMemory(
        lambda: namespace.values(), lambda: [TorchFramework(torch, layer)]
    )
    assert layer.in_use() is False
    assert layer.device_of(namespace["t"].untyped_storage()) is None
    assert memory.held() == {}
    assert memory.evict([]).moved_objects == 0
    assert memory.begin_cell((0,)) is None


def test_the_cuda_layer_maps_ordinals_to_physical_devices() -> None:
    class Storage:
        def __init__(self, kind: str, index: int | None) -> None:
            self.device = torch.device(kind, index) if index is not None else torch.device(kind)

    restricted = CudaTorchLayer(torch, DeviceNumbering(visible=(2, 5)))
    assert restricted.device_of(Storage("cuda", 1)) == 5
    assert restricted.device_of(Storage("cpu", None)) is None
    with pytest.raises(RuntimeError, match="GPU 3 is not visible"):
        restricted.copy(Storage("cpu", None), 3)
    assert CudaTorchLayer(torch, DeviceNumbering()).device_of(Storage("cuda", 3)) == 3


def test_a_huge_list_costs_no_more_than_the_limit() -> None:
    huge = list(range(1_000_000))
    t = torch.ones(1)
    framework = TorchFramework(torch, FakeDevices())
    assert find_arrays([huge, t], [framework], limit=100) == [(framework, t)]
    assert find_arrays([[huge, [t]]], [framework], limit=1000) == []  # past the limit


def test_gpu_tensors_travel_as_host_copies_and_follow_the_next_binding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 4 of issue 12: GPU memory reaches the other replicas as host bytes (they have no
    GPU bound), stays in host memory there, and the first cell run there with GPUs moves it
    onto the bound device. The executor's GPU is faked: storages listed in ``on_gpu`` are
    reported as living on physical GPU 1."""
    from nbcluster.kernel import _host_copies
    from nbcluster.kernel._host_copies import SyncedHostCopies, host_copy_origin
    from nbcluster.kernel._sync import StateSynchronizer, decode_payload, encode_payload
    from nbcluster.store import InMemoryStore

    store = InMemoryStore()
    executor_ns: dict[str, Any] = {"__name__": "__main__"}
    follower_ns: dict[str, Any] = {"__name__": "__main__"}
    executor = StateSynchronizer(executor_ns, set(), store)
    follower = StateSynchronizer(follower_ns, set(), store)
    model, optimizer = trained_pair()
    executor_ns.update(model=model, optimizer=optimizer)
    on_gpu = {p.untyped_storage().data_ptr() for p in model.parameters()}
    monkeypatch.setattr(
        _host_copies, "device_origin", lambda s: 1 if s.data_ptr() in on_gpu else None
    )

    first = executor.capture(1, "model, optimizer\n", "<cell-1>")
    assert first.payload is not None
    follower.apply(decode_payload(encode_payload(first.payload)))
    copy, copied_optimizer = follower_ns["model"], follower_ns["optimizer"]
    parameters = list(copy.parameters())
    assert all(host_copy_origin(p) == 1 for p in parameters)
    assert all(torch.equal(a, b) for a, b in zip(parameters, model.parameters(), strict=True))
    # the optimizer still holds the model's parameters (one object on the follower too)
    assert copied_optimizer.param_groups[0]["params"][0] is parameters[0]
    # host bytes pickle the same at every capture: a cell that only mentions the model does
    # not ship it again
    again = executor.capture(2, "print(model)\n", "<cell-2>")
    shipped = {s for e in (again.payload or {"set": []})["set"] for s in e["slots"]}
    assert "model" not in shipped

    devices = FakeDevices()
    memory = NamespaceDeviceMemory(
        lambda: list(follower_ns.values()),
        lambda: [TorchFramework(torch, devices)],
        host_copies=SyncedHostCopies(),
    )
    restore = memory.begin_cell((0,))
    assert restore is not None and restore.devices == (0,)
    parameters = list(follower_ns["model"].parameters())
    assert all(devices.device(p) == 0 for p in parameters)
    assert copied_optimizer.param_groups[0]["params"][0] is parameters[0]
    assert all(host_copy_origin(p) is None for p in parameters)
    memory.end_cell()
