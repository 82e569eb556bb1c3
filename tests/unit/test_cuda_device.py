"""CUDA in the kernel process (``kernel._cuda``), without a GPU: the driver initialised once at
start with the environment of that moment, the numbering it fixes, and the bound device made
current in the frameworks (fakes of torch.cuda and CuPy that record what they were asked)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster import runtime
from nbcluster.kernel import _cuda
from nbcluster.kernel._cuda import DeviceNumbering, init_driver, make_current


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "_cell_gpus", None)
    monkeypatch.setattr(_cuda, "_numbering", DeviceNumbering())
    monkeypatch.setattr(_cuda, "_torch_queued", set())
    for name in ("torch.cuda", "cupy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield


# -- numbering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ordinals", "physical"),
    [
        (None, {0: 0, 3: 3}, {0: 0, 7: 7}),
        ("2,5", {2: 0, 5: 1, 0: None}, {0: 2, 1: 5, 2: None}),
        (" 4 ", {4: 0, 0: None}, {0: 4}),
        ("", {0: None}, {0: None}),
        ("GPU-8f2e,1", {1: None, 0: None}, {0: None}),
    ],
)
def test_numbering(
    value: str | None, ordinals: dict[int, int | None], physical: dict[int, int | None]
) -> None:
    numbering = DeviceNumbering.from_environment(value)
    assert {p: numbering.ordinal(p) for p in ordinals} == ordinals
    assert {o: numbering.physical(o) for o in physical} == physical


# -- the driver ---------------------------------------------------------------------------------


class FakeLibcuda:
    def __init__(self, result: int = 0) -> None:
        self.calls: list[int] = []
        self.result = result

    def cuInit(self, flags: int) -> int:  # the driver's name
        self.calls.append(flags)
        return self.result


def test_the_driver_is_initialised_with_the_environment_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lib = FakeLibcuda()
    assert init_driver(lambda: lib) is True
    assert lib.calls == [0]
    assert _cuda.numbering() == DeviceNumbering()  # every device, ordinal = physical
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")  # a life-long binding
    assert init_driver(lambda: lib) is True
    assert _cuda.numbering().ordinal(2) == 1


def test_without_a_driver_nothing_is_initialised() -> None:
    assert init_driver(lambda: None) is False
    assert init_driver(lambda: FakeLibcuda(result=100)) is False  # CUDA_ERROR_NO_DEVICE


def test_the_real_loader_says_whether_this_host_has_a_driver() -> None:
    """On a machine without an NVIDIA driver (CI) the kernel starts all the same."""
    assert isinstance(init_driver(), bool)


# -- the current device -------------------------------------------------------------------------


class FakeTorchCuda(types.ModuleType):
    """torch.cuda as far as ``make_current`` uses it: initialised or not, a queue of calls
    run at initialisation, the current device."""

    def __init__(self, initialised: bool) -> None:
        super().__init__("torch.cuda")
        self.initialised = initialised
        self.queued: list[Callable[[], None]] = []
        self.current: int | None = None

    def is_initialized(self) -> bool:
        return self.initialised

    def _lazy_call(self, call: Callable[[], None]) -> None:
        if self.initialised:
            call()
        else:
            self.queued.append(call)

    def set_device(self, ordinal: int) -> None:
        self.current = ordinal

    def init(self) -> None:
        self.initialised = True
        for call in self.queued:
            call()


def install_torch(monkeypatch: pytest.MonkeyPatch, cuda: FakeTorchCuda) -> None:
    torch = types.ModuleType("torch")
    torch.cuda = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.cuda", cuda)


def test_torch_in_use_gets_the_bound_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeTorchCuda(initialised=True)
    install_torch(monkeypatch, cuda)
    assert make_current((3, 1)) == []
    assert cuda.current == 3
    monkeypatch.setattr(_cuda, "_numbering", DeviceNumbering(visible=(1, 3)))
    assert make_current((3,)) == []
    assert cuda.current == 1  # this process's ordinal of physical 3


def test_torch_not_yet_initialised_gets_the_device_bound_when_it_initialises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeTorchCuda(initialised=False)
    install_torch(monkeypatch, cuda)
    make_current((2,))
    make_current((4,))
    assert cuda.current is None  # no context for a cell that does not use CUDA
    assert len(cuda.queued) == 1  # queued once
    monkeypatch.setattr(runtime, "_cell_gpus", (5,))  # the cell that initialises it
    cuda.init()
    assert cuda.current == 5


def test_the_queued_call_never_breaks_torchs_initialisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeTorchCuda(initialised=False)

    def broken(ordinal: int) -> None:
        raise RuntimeError("invalid device ordinal")

    cuda.set_device = broken  # type: ignore[method-assign]
    install_torch(monkeypatch, cuda)
    make_current((0,))
    monkeypatch.setattr(runtime, "_cell_gpus", (0,))
    cuda.init()  # does not raise
    assert cuda.initialised


def test_cupy_gets_the_bound_device_and_failures_are_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    used: list[int] = []

    class Device:
        def __init__(self, ordinal: int) -> None:
            self.ordinal = ordinal

        def use(self) -> None:
            if self.ordinal > 7:
                raise RuntimeError("cudaErrorInvalidDevice")
            used.append(self.ordinal)

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=Device)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert make_current((6,)) == []
    assert used == [6]
    assert make_current((9,)) == ["could not make GPU 9 current in cupy: cudaErrorInvalidDevice"]


def test_a_device_this_process_cannot_see_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeTorchCuda(initialised=True)
    install_torch(monkeypatch, cuda)
    monkeypatch.setattr(_cuda, "_numbering", DeviceNumbering(visible=(0, 2)))
    assert make_current((1,)) == []
    assert cuda.current is None


def test_a_framework_imported_by_the_cell_starts_on_the_bound_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fakegpu_nbc.py").write_text("current = None\n")
    calls: list[tuple[Any, int | None]] = []

    def select(module: Any, ordinal: int | None) -> None:
        calls.append((module, ordinal))

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_cuda._SELECTORS, "fakegpu_nbc", select)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    _cuda.install_import_hook()
    _cuda.install_import_hook()
    assert sys.meta_path.count(_cuda._hook) == 1
    monkeypatch.setattr(runtime, "_cell_gpus", (4,))
    try:
        import fakegpu_nbc  # type: ignore[import-not-found]

        assert calls == [(fakegpu_nbc, 4)]
        assert fakegpu_nbc.current is None  # executed as usual
    finally:
        sys.modules.pop("fakegpu_nbc", None)


@pytest.mark.parametrize(
    ("lines", "kept"),
    [
        (["%%cpu\n", "x = 1\n"], ["x = 1\n"]),
        (["# note\n", "%%cpu\n", "x = 1\n"], ["# note\n", "x = 1\n"]),
        (["x = 1\n", "%%cpu\n"], ["x = 1\n", "%%cpu\n"]),
        (["%%cpus\n"], ["%%cpus\n"]),
    ],
)
def test_the_cpu_line_is_dropped_before_ipython_reads_the_cell(
    lines: list[str], kept: list[str]
) -> None:
    from nbcluster.kernel._gpus import strip_cpu_magic

    assert strip_cpu_magic(lines) == kept
