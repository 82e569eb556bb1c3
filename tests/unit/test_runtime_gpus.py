"""GPUs inside a cell: ``nbcluster.runtime`` and the kernel's per-cell binding
(``metadata["nbcluster"]["gpus"]`` applied to ``CUDA_VISIBLE_DEVICES`` while the cell runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbcluster import runtime
from nbcluster.kernel._gpus import (
    CUDA_ENV,
    DEVICE_ORDER_ENV,
    bound_gpus,
    cell_gpus,
    parse_cell_gpus,
    use_nvml_device_order,
)

GPUS_ENV = "NBCLUSTER_GPUS"


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts outside any kernel: no binding, no nbcluster variables; the real
    environment and the runtime's state are put back afterwards."""
    for name in (CUDA_ENV, GPUS_ENV, DEVICE_ORDER_ENV, "NBCLUSTER_KERNEL_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_cell_gpus", None)
    monkeypatch.setattr(runtime, "_kernel_running", False)
    yield


# -- nbcluster.runtime ------------------------------------------------------------------------


def test_no_binding_outside_nbcluster() -> None:
    assert runtime.gpus() == ()
    assert runtime.in_nbcluster() is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0,2", (0, 2)), ("3", (3,)), (" 1, 3 ", (1, 3)), ("", ()), ("  ", ()), ("0,,2", (0, 2))],
)
def test_gpus_from_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[int, ...]
) -> None:
    monkeypatch.setenv(GPUS_ENV, value)
    assert runtime.gpus() == expected


@pytest.mark.parametrize("value", ["a,b", "0,x", "-1", "0,-2", "1.5"])
def test_malformed_environment_warns_and_gives_none(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(GPUS_ENV, value)
    with pytest.warns(RuntimeWarning, match=GPUS_ENV):
        assert runtime.gpus() == ()


def test_cell_binding_takes_precedence_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPUS_ENV, "0,2")
    assert runtime._set_cell_gpus((1,)) is None
    assert runtime.gpus() == (1,)
    assert runtime._set_cell_gpus(()) == (1,)
    assert runtime.gpus() == ()  # an empty binding is "no GPU", not "ask the environment"
    assert runtime._set_cell_gpus(None) == ()
    assert runtime.gpus() == (0, 2)


def test_in_nbcluster(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not runtime.in_nbcluster()
    monkeypatch.setenv("NBCLUSTER_KERNEL_ID", "k1")  # a replica, or a process it started
    assert runtime.in_nbcluster()
    monkeypatch.delenv("NBCLUSTER_KERNEL_ID")
    runtime._mark_kernel()
    assert runtime.in_nbcluster()


def test_public_api() -> None:
    assert runtime.__all__ == ["gpus", "in_nbcluster"]


# -- reading the metadata ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [None, {}, "x", {"nbcluster": None}, {"nbcluster": "x"}, {"nbcluster": {"term": 3}}],
)
def test_metadata_without_gpus_binds_nothing(metadata: Any) -> None:
    assert parse_cell_gpus(metadata) == (None, None)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"gpus": [0, 2]}, (0, 2)),
        ({"gpus": []}, ()),
        ({"term": 4, "attempt": 1, "after_term": 3, "gpus": [5]}, (5,)),
        ({"gpus": (1, 0)}, (1, 0)),
    ],
)
def test_valid_gpus(meta: dict[str, Any], expected: tuple[int, ...]) -> None:
    assert parse_cell_gpus({"nbcluster": meta}) == (expected, None)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0,2", "got str '0,2'"),
        (None, "got NoneType None"),
        (3, "got int 3"),
        ({"0": 1}, "got dict"),
        ([0, -1], "item 1 of [0, -1] is negative (-1)"),
        ([True], "item 0 of [True] is bool True, not an int"),
        ([1.0], "is float 1.0, not an int"),
        (["0"], "is str '0', not an int"),
        ([None], "is NoneType None, not an int"),
        ([0, 2, 0], "device 0 appears more than once"),
    ],
)
def test_invalid_gpus_name_the_problem(value: Any, fragment: str) -> None:
    devices, problem = parse_cell_gpus({"nbcluster": {"term": 1, "gpus": value}})
    assert devices is None
    assert problem is not None and fragment in problem


def test_huge_invalid_value_is_shortened() -> None:
    _, problem = parse_cell_gpus({"nbcluster": {"gpus": "x" * 10_000}})
    assert problem is not None and len(problem) < 200


# -- applying a binding -----------------------------------------------------------------------


def test_binding_sets_environment_and_runtime_then_removes_them() -> None:
    with bound_gpus((0, 2)):
        assert os.environ[CUDA_ENV] == "0,2"
        assert os.environ[GPUS_ENV] == "0,2"
        assert runtime.gpus() == (0, 2)
    assert CUDA_ENV not in os.environ
    assert GPUS_ENV not in os.environ
    assert runtime._cell_gpus is None
    assert runtime.gpus() == ()


def test_empty_binding_hides_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUDA_ENV, "0,1,2,3")
    with bound_gpus(()):
        assert os.environ[CUDA_ENV] == ""  # CUDA sees no device
        assert runtime.gpus() == ()
    assert os.environ[CUDA_ENV] == "0,1,2,3"


def test_binding_restores_a_life_long_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    # reservation: the gateway set both variables at launch
    monkeypatch.setenv(CUDA_ENV, "0,2")
    monkeypatch.setenv(GPUS_ENV, "0,2")
    with bound_gpus((1,)):
        assert (os.environ[CUDA_ENV], runtime.gpus()) == ("1", (1,))
    assert (os.environ[CUDA_ENV], os.environ[GPUS_ENV], runtime.gpus()) == ("0,2", "0,2", (0, 2))


def test_binding_is_restored_when_the_cell_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUDA_ENV, "7")
    runtime._set_cell_gpus((7,))
    with pytest.raises(KeyboardInterrupt), bound_gpus((3, 4)):
        assert runtime.gpus() == (3, 4)
        raise KeyboardInterrupt
    assert os.environ[CUDA_ENV] == "7"
    assert GPUS_ENV not in os.environ
    assert runtime.gpus() == (7,)


def test_a_value_the_cell_set_itself_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUDA_ENV, "0")
    with bound_gpus((1,)):
        os.environ[CUDA_ENV] = "5"  # %env CUDA_VISIBLE_DEVICES=5 in the cell
    assert os.environ[CUDA_ENV] == "5"
    assert GPUS_ENV not in os.environ


def test_child_processes_inherit_the_binding() -> None:
    script = (
        "import os; from nbcluster import runtime; "
        f"print(os.environ[{CUDA_ENV!r}], runtime.gpus(), sep='|')"
    )
    with bound_gpus((1, 3)):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
    assert out.strip() == "1,3|(1, 3)"


def test_cell_gpus_applies_valid_metadata() -> None:
    warnings: list[str] = []
    with cell_gpus({"nbcluster": {"term": 2, "gpus": [2]}}, warnings.append) as devices:
        assert devices == (2,)
        assert os.environ[CUDA_ENV] == "2"
    assert CUDA_ENV not in os.environ
    assert warnings == []


def test_cell_gpus_without_gpus_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUDA_ENV, "0,2")
    warnings: list[str] = []
    with cell_gpus({"nbcluster": {"term": 2}}, warnings.append) as devices:
        assert devices is None
        assert os.environ[CUDA_ENV] == "0,2"
    assert os.environ[CUDA_ENV] == "0,2"
    assert warnings == []


def test_cell_gpus_warns_about_invalid_metadata_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CUDA_ENV, "0,2")
    warnings: list[str] = []
    with cell_gpus({"nbcluster": {"gpus": [0, "1"]}}, warnings.append) as devices:
        assert devices is None
        assert os.environ[CUDA_ENV] == "0,2"
        assert GPUS_ENV not in os.environ
        assert runtime._cell_gpus is None
    assert os.environ[CUDA_ENV] == "0,2"
    assert len(warnings) == 1
    assert "nbcluster.gpus" in warnings[0]
    assert "item 1 of [0, '1'] is str '1', not an int" in warnings[0]
    assert warnings[0].endswith("\n")


def test_cell_gpus_restores_after_an_exception() -> None:
    with (
        pytest.raises(ZeroDivisionError),
        cell_gpus({"nbcluster": {"gpus": [0]}}, lambda _: None),
    ):
        _ = 1 / 0
    assert CUDA_ENV not in os.environ
    assert runtime.gpus() == ()


def test_device_order_follows_nvml_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_nvml_device_order()
    assert os.environ[DEVICE_ORDER_ENV] == "PCI_BUS_ID"
    monkeypatch.setenv(DEVICE_ORDER_ENV, "FASTEST_FIRST")
    use_nvml_device_order()
    assert os.environ[DEVICE_ORDER_ENV] == "FASTEST_FIRST"


# -- a real replica kernel --------------------------------------------------------------------

PROBE = (
    "import os, subprocess, sys\n"
    "from nbcluster import runtime\n"
    "child = subprocess.run([sys.executable, '-c', "
    "'import os; print(os.environ.get(\"CUDA_VISIBLE_DEVICES\"))'], "
    "capture_output=True, text=True).stdout.strip()\n"
    "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')), runtime.gpus(), "
    "runtime.in_nbcluster(), child, sep='|')\n"
)


class _Kernel:
    """A ReplicaKernel process on loopback, driven with jupyter_client."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        from jupyter_client.blocking import BlockingKernelClient
        from jupyter_client.connect import write_connection_file

        connection_file = str(tmp_path / "kernel.json")
        write_connection_file(connection_file, ip="127.0.0.1")
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in {CUDA_ENV, GPUS_ENV, DEVICE_ORDER_ENV, "NBCLUSTER_KERNEL_ID"}
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nbcluster.kernel", "-f", connection_file],
            env=full_env | env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = BlockingKernelClient(connection_file=connection_file)
        self.client.load_connection_file()
        # A busy machine can delay the new kernel's heartbeat past jupyter_client's 1 s, which
        # wait_for_ready takes for a dead kernel.
        self.client.hb_channel.time_to_dead = 30.0
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def execute(self, code: str, metadata: dict[str, Any] | None = None) -> tuple[str, str, str]:
        """Run ``code``; return (reply status, stdout, stderr)."""
        content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
        msg = self.client.session.msg("execute_request", content, metadata=metadata or {})
        self.client.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        # wait_for_ready may have sent several kernel_info requests to a slow-starting kernel:
        # their late replies come first.
        reply = self.client.get_shell_msg(timeout=30)
        while reply["msg_type"] == "kernel_info_reply":
            reply = self.client.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        streams = {"stdout": "", "stderr": ""}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = self.client.get_iopub_msg(timeout=30)
            if out["parent_header"].get("msg_id") != msg_id:
                continue
            if out["msg_type"] == "stream":
                streams[out["content"]["name"]] += out["content"]["text"]
            if out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
                break
        return reply["content"]["status"], streams["stdout"].strip(), streams["stderr"]

    def close(self) -> None:
        self.client.stop_channels()
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def kernel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[_Kernel]:
    k = _Kernel(tmp_path, getattr(request, "param", {}))
    try:
        yield k
    finally:
        k.close()


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_replica_kernel_binds_gpus_per_cell(kernel: _Kernel) -> None:
    order = "import os; print(os.environ.get('CUDA_DEVICE_ORDER'))"
    assert kernel.execute(order) == ("ok", "PCI_BUS_ID", "")
    assert kernel.execute(PROBE) == ("ok", "None|()|True|None", "")
    bound = {"nbcluster": {"gpus": [1, 3]}}
    assert kernel.execute(PROBE, bound) == ("ok", "'1,3'|(1, 3)|True|1,3", "")
    # a cell that raises: the binding is gone afterwards all the same
    status, _, _ = kernel.execute("raise ValueError('boom')", {"nbcluster": {"gpus": [0]}})
    assert status == "error"
    assert kernel.execute(PROBE, {"nbcluster": {"term": 1}}) == ("ok", "None|()|True|None", "")
    assert kernel.execute(PROBE, {"nbcluster": {"gpus": []}}) == ("ok", "''|()|True|", "")
    status, out, err = kernel.execute(PROBE, {"nbcluster": {"gpus": "0,1"}})
    assert (status, out) == ("ok", "None|()|True|None")
    assert "ignoring the GPU binding" in err and "got str '0,1'" in err


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kernel", [{CUDA_ENV: "0,2", GPUS_ENV: "0,2"}], indirect=True)
def test_replica_kernel_with_life_long_gpus(kernel: _Kernel) -> None:
    assert kernel.execute(PROBE) == ("ok", "'0,2'|(0, 2)|True|0,2", "")
    assert kernel.execute(PROBE, {"nbcluster": {"gpus": [1]}}) == ("ok", "'1'|(1,)|True|1", "")
    assert kernel.execute(PROBE) == ("ok", "'0,2'|(0, 2)|True|0,2", "")
