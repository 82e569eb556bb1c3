"""Interpreter state (environ, cwd, sys.path, generators, decimal, NumPy, IPython) captured on one
"replica" and restored on another: here, the same process, its state reset in between."""

from __future__ import annotations

import decimal
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Int, List, Unicode
from traitlets.config import Config, Configurable

from nbcluster.kernel._interpreter import (
    DEFAULT_PROBES,
    NOT_APPLICABLE,
    InterpreterProbe,
    InterpreterRestoreError,
    InterpreterStateError,
    Lossy,
    capture_all,
    changed,
    decode_state,
    encode_state,
    environ_excluded,
    restore_all,
)

from .strategies import fast

PROBES = {probe.name: probe for probe in DEFAULT_PROBES}


@pytest.fixture(autouse=True)
def saved_interpreter() -> Iterator[None]:
    """Put back every piece of global state these tests change, for the tests that follow."""
    environ = dict(os.environ)
    cwd = os.getcwd()
    path = list(sys.path)
    limit = sys.getrecursionlimit()
    context = decimal.getcontext()
    context_copy = context.copy()
    random_state = random.getstate()
    numpy_state = np.random.get_state()
    numpy_options = np.get_printoptions()
    torch = sys.modules.get("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.path[:] = path
        sys.setrecursionlimit(limit)
        decimal.setcontext(context)
        for field in ("prec", "rounding", "Emin", "Emax", "capitals", "clamp"):
            setattr(context, field, getattr(context_copy, field))
        context.flags.update(context_copy.flags)
        context.traps.update(context_copy.traps)
        random.setstate(random_state)
        np.random.set_state(numpy_state)
        np.set_printoptions(**numpy_options)
        torch = sys.modules.get("torch")
        if torch is not None and torch_state is not None:
            torch.random.set_rng_state(torch_state)


def new_shell() -> InteractiveShell:
    config = Config()  # one per shell: %config merges into it in place
    config.HistoryManager.hist_file = ":memory:"
    return InteractiveShell(config=config)


@pytest.fixture
def shells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """An executor's and a follower's IPython shell, in this process."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    executor, follower = new_shell(), new_shell()
    try:
        yield executor, follower
    finally:
        follower.cleanup()
        executor.cleanup()


def through_log(value: object) -> object:
    """What a follower gets: the value encoded and decoded as it travels in a record."""
    return decode_state(encode_state({"v": value}))["v"]


def transfer(probe: InterpreterProbe, reset: Any, shell: Any = None) -> object:
    """Capture with ``probe``, reset the state with ``reset()``, restore; returns the capture."""
    value = probe.capture(shell)
    reset()
    probe.restore(shell, through_log(value))
    assert probe.capture(shell) == value
    return value


# -- each probe -------------------------------------------------------------------------------


def test_environ_is_restored_exactly() -> None:
    os.environ["NBC_TEST_SET"] = "by the cell"
    os.environ.pop("NBC_TEST_UNSET", None)

    def reset() -> None:
        del os.environ["NBC_TEST_SET"]
        os.environ["NBC_TEST_UNSET"] = "only on the follower"

    value = transfer(PROBES["environ"], reset)
    assert isinstance(value, dict)
    assert os.environ["NBC_TEST_SET"] == "by the cell"
    assert "NBC_TEST_UNSET" not in os.environ


def test_environ_never_touches_per_process_variables() -> None:
    mine = {
        "NBCLUSTER_REPLICA_ID": "r-follower",
        "CUDA_VISIBLE_DEVICES": "1",
        "JPY_PARENT_PID": "123",
        "JPY_SESSION_NAME": "follower.ipynb",
        "HOSTNAME": "follower-host",
    }
    os.environ.update(mine)
    value = PROBES["environ"].capture(None)
    assert isinstance(value, dict)
    assert not set(mine) & set(value)
    # The executor's own values for them, if a record carried them, are ignored too.
    PROBES["environ"].restore(None, {**value, "NBCLUSTER_REPLICA_ID": "r-exec", "JPY_X": "1"})
    assert {k: os.environ.get(k) for k in mine} == mine
    assert "JPY_X" not in os.environ
    # ... and a follower's value is not deleted because the executor's capture lacks it.
    PROBES["environ"].restore(None, {})
    assert {k: os.environ.get(k) for k in mine} == mine
    assert environ_excluded("NBCLUSTER_ANYTHING") and not environ_excluded("PATH")


def test_environ_bad_entries_are_named_and_the_rest_applied() -> None:
    value = PROBES["environ"].capture(None)
    assert isinstance(value, dict)
    with pytest.raises(InterpreterRestoreError, match="BAD=NAME"):
        PROBES["environ"].restore(None, {**value, "BAD=NAME": "x", "NBC_TEST_GOOD": "y"})
    assert os.environ["NBC_TEST_GOOD"] == "y"


def test_cwd(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    value = transfer(PROBES["cwd"], lambda: os.chdir("/"))
    assert value == str(tmp_path) == os.getcwd()


def test_cwd_missing_on_this_host_is_reported_not_fatal(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    missing = str(tmp_path / "only-on-the-executor")
    problems = restore_all(None, {"cwd": missing, "recursion_limit": 2345})
    assert len(problems) == 1
    assert problems[0].startswith("cwd: ") and missing in problems[0]
    assert str(tmp_path) in problems[0]  # says where the cells run instead
    assert os.getcwd() == str(tmp_path)
    assert sys.getrecursionlimit() == 2345  # the other entries were restored


def test_cwd_removed_under_the_executor_is_named(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    os.chdir(gone)
    gone.rmdir()
    problems: list[str] = []
    state = capture_all(None, [PROBES["cwd"]], problems=problems)
    assert state == {}
    assert problems and problems[0].startswith("cwd: the working directory is gone")


def test_sys_path_restored_in_place() -> None:
    the_list = sys.path
    sys.path.insert(0, "/opt/from-the-cell")

    def reset() -> None:
        sys.path.pop(0)
        sys.path.append("/only/on/the/follower")

    transfer(PROBES["sys_path"], reset)
    assert sys.path is the_list
    assert sys.path[0] == "/opt/from-the-cell"
    assert "/only/on/the/follower" not in sys.path


def test_sys_path_of_path_objects_is_plain() -> None:
    sys.path.append(Path("/opt/pathlib"))  # type: ignore[arg-type]
    sys.path.append(42)  # type: ignore[arg-type]
    problems: list[str] = []
    value = capture_all(None, [PROBES["sys_path"]], problems=problems)["sys_path"]
    assert isinstance(value, list) and value[-1] == "/opt/pathlib"
    assert problems == ["sys_path: sys.path entries that are not paths: 42"]


def test_recursion_limit() -> None:
    sys.setrecursionlimit(4321)
    assert transfer(PROBES["recursion_limit"], lambda: sys.setrecursionlimit(1000)) == 4321


def test_decimal_context_restored_into_the_current_context() -> None:
    ctx = decimal.getcontext()
    ctx.prec = 7
    ctx.rounding = decimal.ROUND_DOWN
    ctx.Emax = 9999
    ctx.capitals = 0
    ctx.traps[decimal.DivisionByZero] = False
    ctx.traps[decimal.Inexact] = False
    ctx.clear_flags()
    decimal.Decimal(2).sqrt()  # sets the Inexact and Rounded flags
    ctx.traps[decimal.Inexact] = True

    def reset() -> None:
        decimal.setcontext(decimal.Context())  # even a new context object

    value = transfer(PROBES["decimal_context"], reset)
    assert isinstance(value, dict)
    assert value["prec"] == 7 and "Inexact" in value["flags"] and "Inexact" in value["traps"]
    with pytest.raises(decimal.Inexact):  # the trap came back
        +decimal.Decimal("1.23456789")
    decimal.getcontext().traps[decimal.Inexact] = False
    assert str(+decimal.Decimal("1.23456789")) == "1.234567"  # ROUND_DOWN, 7 digits


def test_decimal_context_bad_value_leaves_the_context_alone() -> None:
    before = PROBES["decimal_context"].capture(None)
    assert isinstance(before, dict)
    with pytest.raises(InterpreterRestoreError, match="unknown decimal signals"):
        PROBES["decimal_context"].restore(None, {**before, "prec": 3, "traps": ["Nonsense"]})
    with pytest.raises(ValueError):
        PROBES["decimal_context"].restore(None, {**before, "prec": 3, "Emax": -5})
    assert PROBES["decimal_context"].capture(None) == before


def test_random_state() -> None:
    random.seed(42)
    random.gauss(0, 1)  # leaves a cached second normal value in the state
    expected = [random.random(), random.gauss(0, 1)]
    random.seed(42)
    random.gauss(0, 1)
    transfer(PROBES["random_state"], lambda: random.seed(0))
    assert [random.random(), random.gauss(0, 1)] == expected


def test_numpy_random_state() -> None:
    np.random.seed(7)
    np.random.standard_normal()  # the legacy generator caches the second gaussian
    state = np.random.get_state()
    expected = (np.random.rand(3), np.random.standard_normal())
    np.random.set_state(state)
    value = transfer(PROBES["numpy_random_state"], lambda: np.random.seed(0))
    assert isinstance(value, tuple) and value[0] == "MT19937" and value[3] == 1
    rand, normal = np.random.rand(3), np.random.standard_normal()
    assert rand.tolist() == expected[0].tolist() and normal == expected[1]


def test_numpy_printoptions() -> None:
    np.set_printoptions(precision=3, threshold=20, suppress=True, sign="+")

    def reset() -> None:
        np.set_printoptions(precision=8, threshold=1000, suppress=False, sign="-")

    value = transfer(PROBES["numpy_printoptions"], reset)
    assert isinstance(value, dict) and value["precision"] == 3
    assert repr(np.array([1.23456])) == "array([+1.235])"


def test_numpy_formatter_is_named_as_not_transferable() -> None:
    np.set_printoptions(precision=4, formatter={"float": lambda x: f"<{x}>"})
    problems: list[str] = []
    state = capture_all(None, [PROBES["numpy_printoptions"]], problems=problems)
    assert state["numpy_printoptions"]["precision"] == 4  # type: ignore[index]
    assert "formatter" not in state["numpy_printoptions"]  # type: ignore[operator]
    assert problems == [
        "numpy_printoptions: np.set_printoptions(formatter=...) is code and stays on this replica"
    ]
    # Without a formatter on the executor, "None" travels and clears a follower's formatter.
    np.set_printoptions(formatter=None)
    plain = PROBES["numpy_printoptions"].capture(None)
    np.set_printoptions(formatter={"float": lambda x: "x"})
    PROBES["numpy_printoptions"].restore(None, plain)
    assert np.get_printoptions()["formatter"] is None


def test_torch_random_state_leaves_cuda_alone() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    value = transfer(PROBES["torch_random_state"], lambda: torch.manual_seed(99))
    assert isinstance(value, bytes)
    assert torch.equal(torch.rand(4), expected)
    assert not torch.cuda.is_initialized()


def test_ipython_precision(shells: tuple[Any, Any]) -> None:
    executor, follower = shells
    executor.run_line_magic("precision", "3")
    probe = PROBES["ipython_precision"]
    value = probe.capture(executor)
    assert value == "3"
    assert probe.capture(follower) == ""
    probe.restore(follower, through_log(value))
    formatter = follower.display_formatter.formatters["text/plain"]
    assert formatter.float_precision == "3" and formatter.float_format == "%.3f"
    assert probe.capture(None) is NOT_APPLICABLE


def test_ipython_config(shells: tuple[Any, Any]) -> None:
    executor, follower = shells
    executor.run_line_magic("config", "PlainTextFormatter.max_width = 50")
    executor.run_line_magic("config", "InlineBackend.figure_formats = ['svg']")
    probe = PROBES["ipython_config"]
    value = probe.capture(executor)
    assert isinstance(value, dict)
    assert value["PlainTextFormatter"] == {"max_width": 50}
    assert value["InlineBackend"] == {"figure_formats": ["svg"]}
    assert probe.capture(follower) != value
    probe.restore(follower, through_log(value))
    assert follower.display_formatter.formatters["text/plain"].max_width == 50
    assert probe.capture(follower) == value

    # A configurable the follower creates later finds the setting, as after %config.
    class InlineBackend(Configurable):
        figure_formats = List(Unicode()).tag(config=True)  # stands in for matplotlib's

    assert InlineBackend(parent=follower).figure_formats == ["svg"]
    assert changed({"ipython_config": value}, {"ipython_config": probe.capture(follower)}) == {}


def test_ipython_config_keeps_the_process_own_sections_out() -> None:
    class ReplicaKernelLike(Configurable):
        kernel_id = Int(0).tag(config=True)

    class Shell:
        """Just what the probe reads of a shell."""

        def __init__(self, config: Config) -> None:
            self.config = config
            self.configurables: list[Any] = []
            self.parent = ReplicaKernelLike()

    config = Config()
    config.IPKernelApp.connection_file = "/run/replica-1.json"
    config.ReplicaKernelLike.kernel_id = 1
    config.PlainTextFormatter.max_width = 60
    config.Odd.function = len
    problems: list[str] = []
    state = capture_all(Shell(config), [PROBES["ipython_config"]], problems=problems)
    assert state == {"ipython_config": {"PlainTextFormatter": {"max_width": 60}}}
    assert len(problems) == 1 and "Odd.function" in problems[0]
    # Restoring never writes them either.
    other = Shell(Config())
    PROBES["ipython_config"].restore(
        other, {"IPKernelApp": {"connection_file": "/run/replica-0.json"}}
    )
    assert "IPKernelApp" not in other.config


# -- capture_all, changed, restore_all ------------------------------------------------------------


class Failing:
    name = "failing"

    def capture(self, shell: Any) -> object:
        raise RuntimeError("broken probe")

    def restore(self, shell: Any, value: object) -> None:
        raise RuntimeError("cannot restore")


class Absent:
    name = "absent"

    def capture(self, shell: Any) -> object:
        return NOT_APPLICABLE

    def restore(self, shell: Any, value: object) -> None:
        raise AssertionError("never called")


class Partial:
    name = "partial"

    def capture(self, shell: Any) -> object:
        return Lossy({"kept": 1}, ("the rest stays here",))

    def restore(self, shell: Any, value: object) -> None:
        pass


def test_capture_all_leaves_out_what_does_not_apply_and_names_problems() -> None:
    problems: list[str] = []
    probes: list[InterpreterProbe] = [Failing(), Absent(), Partial(), PROBES["recursion_limit"]]
    state = capture_all(None, probes, problems=problems)
    assert state == {"partial": {"kept": 1}, "recursion_limit": sys.getrecursionlimit()}
    assert problems == [
        "failing: could not read it (RuntimeError: broken probe)",
        "partial: the rest stays here",
    ]
    assert capture_all(None, probes) == state  # without a problems list: nothing raised


def test_capture_all_without_a_shell() -> None:
    state = capture_all(None)
    assert "ipython_precision" not in state and "ipython_config" not in state
    assert {"environ", "cwd", "sys_path", "random_state", "numpy_random_state"} <= set(state)


def test_changed_reports_only_differences() -> None:
    before = capture_all(None)
    assert changed(before, capture_all(None)) == {}
    random.random()
    sys.setrecursionlimit(before["recursion_limit"] + 1)  # type: ignore[operator]
    after = capture_all(None)
    assert set(changed(before, after)) == {"random_state", "recursion_limit"}
    assert changed({}, {"x": 1}) == {"x": 1}
    assert changed({"x": 1}, {"x": True}) == {"x": True}  # equal in Python, not the same value


def test_restore_all_tolerates_bad_entries() -> None:
    state = {"failing": 1, "unknown_probe": 2, "recursion_limit": "x", "random_state": [1]}
    target = capture_all(None)
    random.random()
    state["random_state"] = target["random_state"]
    problems = restore_all(None, state, [*DEFAULT_PROBES, Failing()])
    assert problems == [
        "unknown_probe: unknown interpreter state (from a newer nbcluster?), ignored",
        "recursion_limit: expected an int, got str",
        "failing: could not restore it (RuntimeError: cannot restore)",
    ]
    assert random.getstate() == target["random_state"]  # the good entry was restored


def test_whole_state_round_trip(shells: tuple[Any, Any], tmp_path: Path) -> None:
    executor, follower = shells
    baseline = capture_all(executor)
    os.environ["NBC_TEST_ROUND_TRIP"] = "1"
    os.chdir(tmp_path)
    sys.path.append(str(tmp_path))
    random.seed(1)
    np.random.seed(1)
    decimal.getcontext().prec = 11
    executor.run_line_magic("precision", "2")
    executor.run_line_magic("config", "PlainTextFormatter.max_seq_length = 7")
    np.set_printoptions(linewidth=60)
    problems: list[str] = []
    state = capture_all(executor, problems=problems)
    assert problems == []
    update = changed(baseline, state)
    assert set(update) >= {"environ", "cwd", "sys_path", "random_state", "ipython_precision"}
    # The follower's process: the state the executor started from.
    assert restore_all(follower, baseline) == []
    assert capture_all(follower) != state
    assert restore_all(follower, decode_state(encode_state(update))) == []
    assert capture_all(follower) == state


# -- encoding ---------------------------------------------------------------------------------

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
plain_keys = st.text(max_size=6) | st.integers() | st.tuples(st.integers(), st.text(max_size=3))
plain_data: st.SearchStrategy[Any] = st.recursive(
    plain_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(plain_keys, children, max_size=4)
    ),
    max_leaves=12,
)


def same(a: object, b: object) -> bool:
    """Equal and of the same types all the way down (``1 == True == 1.0`` in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(
            same(k, next(j for j in b if j == k)) and same(v, b[k]) for k, v in a.items()
        )
    return a == b


@fast
@given(st.dictionaries(st.text(max_size=8), plain_data, max_size=5))
def test_encode_decode_round_trip(state: dict[str, object]) -> None:
    assert same(decode_state(encode_state(state)), state)


def test_the_real_state_round_trips() -> None:
    state = capture_all(None)
    assert same(decode_state(encode_state(state)), state)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1})[:-1], "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "trailing bytes"),
        (msgpack.packb([1, 2]), "expected a map of probe names, got list"),
        (msgpack.packb({1: 2}), "probe name 1 is a int, not str"),
        (msgpack.packb({"a": msgpack.ExtType(9, b"")}), "unknown msgpack extension type 9"),
        (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(5))}), "payload is not an array"),
        (msgpack.packb({"a": msgpack.ExtType(2, b"")}), "integer's payload is empty"),
        (msgpack.packb({"a": msgpack.Timestamp(0)}), "a is a Timestamp, not plain data"),
        (msgpack.packb({"a": [{"k": msgpack.Timestamp(1)}]}), "a[0]['k'] is a Timestamp"),
        (msgpack.packb({"a": b"\xff"}, use_bin_type=False), "not valid msgpack"),
        ("not bytes", "expected bytes, got str"),
    ],
)
def test_decode_names_the_problem(data: Any, problem: str) -> None:
    with pytest.raises(InterpreterStateError, match=problem.replace("[", r"\[")):
        decode_state(data)


def test_encode_refuses_what_is_not_plain_data() -> None:
    with pytest.raises(TypeError, match="set is not plain data"):
        encode_state({"a": {1, 2}})
    with pytest.raises(TypeError, match="float64 is not plain data"):
        encode_state({"a": np.float64(1.5)})
    with pytest.raises(TypeError, match="probe names must be str"):
        encode_state({1: 2})  # type: ignore[dict-item]
