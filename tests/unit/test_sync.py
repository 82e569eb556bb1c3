"""StateSynchronizer: an executor's namespace captured cell by cell, applied on followers.

Replicas are simulated in one process: each has its own namespace dict and its own cloudpickle
class registry (swapped in around its calls), as if it were a process of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import linecache
import os.path
import sys
import threading
import traceback
import types
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import cloudpickle.cloudpickle as cloudpickle_impl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.kernel._sync import (
    ApplyResult,
    StateSynchronizer,
    SyncResult,
    _digest,
    decode_payload,
    encode_payload,
)
from nbcluster.store import InMemoryStore, LocalDirectoryStore, StoreError

from .strategies import fast, json_values

#: What IPython hides in the user namespace (``shell.user_ns_hidden``).
HIDDEN = frozenset({"In", "Out", "_dh", "_ih", "_oh", "exit", "get_ipython", "open", "quit"})


class Replica:
    """One simulated replica process: a namespace, a synchroniser and a class registry."""

    def __init__(self, store: Any, threshold: int = 1024 * 1024, **kwargs: Any) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__"}
        self.sync = StateSynchronizer(self.ns, HIDDEN, store, threshold, **kwargs)
        self._by_class: Any = weakref.WeakKeyDictionary()
        self._by_id: Any = weakref.WeakValueDictionary()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = (
            cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS,
            cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID,
        )
        cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS = self._by_class
        cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID = self._by_id
        try:
            yield
        finally:
            (
                cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_CLASS,
                cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID,
            ) = saved

    def run(self, source: str, filename: str) -> None:
        with self.active():
            exec(compile(source, filename, "exec"), self.ns)

    def capture(self, count: int, source: str = "", filename: str = "") -> SyncResult:
        with self.active():
            return self.sync.capture(count, source, filename)

    def apply(self, payload: Any) -> ApplyResult:
        with self.active():
            return self.sync.apply(payload)

    def synced(self) -> dict[str, Any]:
        return {k: v for k, v in self.ns.items() if self.sync.is_synced(k)}


class Cluster:
    """An executor and a follower sharing a store; ``cell`` runs code on the executor, captures
    and applies the payload on the follower through msgpack."""

    def __init__(self, store: Any = None, threshold: int = 1024 * 1024, **kwargs: Any) -> None:
        self.store = store if store is not None else InMemoryStore()
        self.executor = Replica(self.store, threshold, **kwargs)
        self.follower = Replica(self.store, threshold, **kwargs)
        self.count = 0
        self.tag = uuid.uuid4().hex[:8]

    def filename(self, count: int) -> str:
        return f"<cell-{self.tag}-{count}>"

    def cell(self, source: str) -> SyncResult:
        self.count += 1
        filename = self.filename(self.count)
        self.executor.run(source, filename)
        result = self.executor.capture(self.count, source, filename)
        if result.payload is not None:
            self.follower.apply(decode_payload(encode_payload(result.payload)))
        return result

    def failover(self) -> None:
        self.executor, self.follower = self.follower, self.executor


def _hash(data: bytes) -> str:
    return _digest(data)


def shipped(result: SyncResult) -> set[str]:
    """The slots a capture shipped."""
    if not result.payload:
        return set()
    return {slot for entry in result.payload["set"] for slot in entry["slots"]}


def entry_of(payload: Any, slot: str) -> Any:
    """The entry of a payload that carries ``slot``."""
    [entry] = [e for e in payload["set"] if slot in e["slots"]]
    return entry


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


# -- values ---------------------------------------------------------------------------------


def test_plain_values_reach_the_follower(cluster: Cluster) -> None:
    result = cluster.cell(
        "n = 42\nf = 2.5\ns = 'text'\nb = b'\\x00\\x01'\nnothing = None\n"
        "lst = [1, 'two', [3]]\nd = {'k': {'nested': (1, 2)}}\nt = (1, 2)\nfs = frozenset({1, 2})\n"
    )
    assert shipped(result) == {"n", "f", "s", "b", "nothing", "lst", "d", "t", "fs"}
    assert result.payload is not None
    assert result.payload["count"] == 1
    assert result.payload["del"] == []
    assert result.payload["unpicklable"] == []
    assert cluster.follower.synced() == cluster.executor.synced()
    assert cluster.follower.ns["lst"] is not cluster.executor.ns["lst"]


def test_a_second_capture_without_changes_ships_nothing(cluster: Cluster) -> None:
    cluster.cell("x = 1\nlst = [1, 2]\ndef f(): return x\nclass C: pass\nimport json\n")
    result = cluster.executor.capture(2)
    assert shipped(result) == set()
    assert result.count == 2
    # rebinding to an equal value (or the same object) is no change either
    assert shipped(cluster.cell("x = 1\nlst = [1, 2]\n")) == set()


def test_reassignment_ships_only_the_changed_name(cluster: Cluster) -> None:
    cluster.cell("a = 1\nb = [1]\nc = 'c'\n")
    result = cluster.cell("a = 2\n")
    assert shipped(result) == {"a"}
    assert cluster.follower.ns["a"] == 2


def test_mutation_in_place_is_detected(cluster: Cluster) -> None:
    cluster.cell("lst = [1, 2]\nd = {'a': 1}\n")
    result = cluster.cell("lst.append(3)\nd['b'] = [lst]\n")
    assert shipped(result) == {"lst", "d"}
    assert cluster.follower.ns["lst"] == [1, 2, 3]
    assert cluster.follower.ns["d"] == {"a": 1, "b": [[1, 2, 3]]}


def test_deleted_names_are_deleted_on_the_follower(cluster: Cluster) -> None:
    cluster.cell("x = 1\ny = 2\n")
    result = cluster.cell("del x\n")
    assert result.payload is not None
    assert result.payload["del"] == ["x"]
    assert result.payload["set"] == []
    assert "x" not in cluster.follower.ns
    assert cluster.follower.ns["y"] == 2
    assert "x" not in cluster.follower.sync.hashes


class Bomb:
    """Pickling it is interrupted once (the user pressed interrupt during a capture)."""

    armed = True

    def __reduce__(self) -> Any:
        if Bomb.armed:
            Bomb.armed = False
            raise KeyboardInterrupt
        return (Bomb, ())


def test_an_interrupted_capture_leaves_the_diff_state_untouched(cluster: Cluster) -> None:
    cluster.cell("a = 1\n")
    cluster.executor.ns.update(a=2, b=[1], z=Bomb())
    with pytest.raises(KeyboardInterrupt):
        cluster.executor.capture(2)
    result = cluster.executor.capture(2)
    assert shipped(result) == {"a", "b", "z"}


def test_machinery_and_history_names_are_not_synchronised(cluster: Cluster) -> None:
    result = cluster.cell(
        "In = ['']\nOut = {}\n_ = 1\n__ = 2\n_i1 = 'x'\n_5 = 5\n_oh = {}\n"
        "get_ipython = lambda: None\nexit = quit = None\nvisible = 1\n_private = 2\n"
    )
    assert shipped(result) == {"visible", "_private", "_", "__"}  # _ and __: user-bound
    assert cluster.follower.ns["_private"] == 2
    assert cluster.executor.sync.is_synced("visible")
    assert not cluster.executor.sync.is_synced("__builtins__")
    assert not cluster.executor.sync.is_synced("Out")


def test_the_hidden_names_are_read_at_each_capture() -> None:
    hidden: set[str] = set()
    ns: dict[str, Any] = {"late": 1}
    sync = StateSynchronizer(ns, hidden, InMemoryStore())
    hidden.add("late")
    assert shipped(sync.capture(1)) == set()


# -- code ------------------------------------------------------------------------------------


def test_functions_lambdas_and_closures(cluster: Cluster) -> None:
    cluster.cell(
        "scale = 10\n"
        "def f(v, *, extra=1):\n"
        "    '''Scale v.'''\n"
        "    return v * scale + extra\n"
        "f.tag = 'marked'\n"
        "double = lambda v: 2 * v\n"
        "def outer(k):\n"
        "    def inner(v):\n"
        "        return v + k + scale\n"
        "    return inner\n"
        "add3 = outer(3)\n"
        "def rec(n):\n"
        "    return 1 if n <= 1 else n * rec(n - 1)\n"
    )
    ns = cluster.follower.ns
    assert ns["f"](2) == 21
    assert ns["f"](2, extra=5) == 25
    assert ns["f"].__doc__ == "Scale v."
    assert ns["f"].tag == "marked"
    assert ns["double"](4) == 8
    assert ns["add3"](1) == 14
    assert ns["rec"](5) == 120
    # Bound to the follower's namespace: a later change of a global is seen by the function.
    for name in ("f", "double", "add3", "rec"):
        assert ns[name].__globals__ is ns
    cluster.cell("scale = 100\n")
    assert ns["f"](2) == 201
    assert ns["add3"](1) == 104


def test_a_function_is_not_reshipped_when_a_global_it_reads_changes(cluster: Cluster) -> None:
    cluster.cell("x = 1\ndef f():\n    return x\n")
    result = cluster.cell("x = 2\n")
    assert shipped(result) == {"x"}
    assert cluster.follower.ns["f"]() == 2


def test_redefining_a_function_ships_it(cluster: Cluster) -> None:
    cluster.cell("def f():\n    return 1\n")
    result = cluster.cell("def f():\n    return 2\n")
    assert shipped(result) == {"f"}
    assert cluster.follower.ns["f"]() == 2


def test_private_names_are_synchronised_like_any_other(cluster: Cluster) -> None:
    result = cluster.cell(
        "_factor = 3\ndef _helper(v):\n    return v * _factor\ndef g(v):\n    return _helper(v) + 1\n"
    )
    assert shipped(result) == {"g", "_helper", "_factor"}
    assert cluster.follower.ns["g"](2) == 7
    cluster.cell("_factor = 10\n")
    assert cluster.follower.ns["g"](2) == 21


def test_a_function_using_ipython_machinery_stays_picklable(cluster: Cluster) -> None:
    cluster.executor.ns["get_ipython"] = lambda: threading.Lock()  # unpicklable, hidden
    cluster.follower.ns["get_ipython"] = lambda: "follower shell"
    cluster.cell("def shell():\n    return get_ipython()\n")
    assert cluster.follower.ns["shell"]() == "follower shell"


def test_class_in_one_cell_instance_in_a_later_one(cluster: Cluster) -> None:
    cluster.cell(
        "offset = 1\n"
        "class Point:\n"
        "    dims = 2\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def norm1(self):\n"
        "        return abs(self.x) + abs(self.y) + offset\n"
        "    @property\n"
        "    def pair(self):\n"
        "        return (self.x, self.y)\n"
        "    @staticmethod\n"
        "    def origin():\n"
        "        return Point(0, 0)\n"
    )
    result = cluster.cell("p = Point(3, -4)\n")
    assert shipped(result) == {"p"}
    ns = cluster.follower.ns
    assert ns["Point"] is not cluster.executor.ns["Point"]  # separate "processes"
    assert isinstance(ns["p"], ns["Point"])
    assert type(ns["p"]) is ns["Point"]
    assert ns["p"].norm1() == 8
    assert ns["p"].pair == (3, -4)
    assert isinstance(ns["Point"].origin(), ns["Point"])
    with cluster.follower.active():
        exec("q = Point(1, 1)\nsame = type(q) is type(p)\n", ns)
    assert ns["same"]
    # pickling the instance cached __slotnames__ on the class: not a change worth shipping
    assert shipped(cluster.cell("r = 1\n")) == {"r"}


def test_class_and_instances_in_the_same_cell_then_subclass(cluster: Cluster) -> None:
    cluster.cell(
        "class Base:\n"
        "    def hello(self):\n"
        "        return 'base'\n"
        "a = Base()\nb = [Base(), Base()]\n"
    )
    cluster.cell(
        "class Child(Base):\n    def hello(self):\n        return 'child ' + super().hello()\nc = Child()\n"
    )
    ns = cluster.follower.ns
    assert isinstance(ns["a"], ns["Base"])
    assert all(isinstance(x, ns["Base"]) for x in ns["b"])
    assert isinstance(ns["c"], ns["Base"])
    assert isinstance(ns["c"], ns["Child"])
    assert ns["c"].hello() == "child base"


def test_recursive_closures_decorators_dataclasses_and_enums(cluster: Cluster) -> None:
    cluster.cell(
        "import dataclasses, enum, functools\n"
        "def make():\n"
        "    def fact(n):\n"
        "        return 1 if n <= 1 else n * fact(n - 1)\n"
        "    return fact\n"
        "fact = make()\n"
        "def logged(fn):\n"
        "    @functools.wraps(fn)\n"
        "    def wrapper(*args):\n"
        "        return ('logged', fn(*args))\n"
        "    return wrapper\n"
        "@logged\n"
        "def square(v):\n"
        "    return v * v\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Pair:\n"
        "    a: int\n"
        "    b: str = 'b'\n"
        "class Color(enum.Enum):\n"
        "    RED = 1\n"
        "    BLUE = 2\n"
    )
    cluster.cell("pair = Pair(1)\nfavourite = Color.BLUE\n")
    ns = cluster.follower.ns
    assert ns["fact"](5) == 120
    assert ns["square"](3) == ("logged", 9)
    assert ns["square"].__name__ == "square"
    assert ns["pair"] == ns["Pair"](1, "b")
    assert dataclasses.is_dataclass(ns["pair"])
    assert ns["favourite"] is ns["Color"].BLUE
    assert ns["Color"](1) is ns["Color"].RED


def test_modules_and_names_imported_from_installed_modules(cluster: Cluster) -> None:
    result = cluster.cell(
        "import json\nimport os.path as p\nfrom collections import OrderedDict\n"
        "from json import dumps as to_json\nimport xml.etree.ElementTree as ET\n"
    )
    assert result.payload is not None
    assert result.inline_bytes < 1000  # by reference: names, not contents
    ns = cluster.follower.ns
    assert ns["json"] is sys.modules["json"]
    assert ns["p"] is os.path
    assert ns["OrderedDict"] is OrderedDict
    assert ns["to_json"]({"a": 1}) == '{"a": 1}'
    assert ns["ET"].fromstring("<a/>").tag == "a"
    cluster.cell("od = OrderedDict(b=1, a=2)\ndef enc(v):\n    return json.dumps(v)\n")
    assert list(cluster.follower.ns["od"]) == ["b", "a"]
    assert cluster.follower.ns["enc"]([1]) == "[1]"


def test_aliases_of_one_value_stay_one_object_on_the_follower(cluster: Cluster) -> None:
    cluster.cell("a = [1]\nb = a\n")
    assert cluster.follower.ns["a"] == cluster.follower.ns["b"] == [1]
    assert cluster.follower.ns["a"] is cluster.follower.ns["b"]


# -- large values -----------------------------------------------------------------------------


def test_a_large_value_goes_through_the_store() -> None:
    store = InMemoryStore()
    cluster = Cluster(store, threshold=1000)
    cluster.executor.run("big = b'x' * 5000\nsmall = 1\n", "<big>")
    result = cluster.executor.capture(1)
    payload = result.payload
    assert payload is not None
    entry: Any = entry_of(payload, "big")
    assert set(entry) == {"slots", "h", "ptr", "size"}
    assert entry["size"] > 5000
    assert result.stored == ("big",)
    # written before capture returned: a follower never sees a pointer to nothing
    assert store.keys() == [entry["ptr"]]
    assert entry["ptr"] == "sync/" + entry["h"]
    assert len(encode_payload(payload)) < 1000
    assert set(entry_of(payload, "small")) == {"slots", "h", "v"}
    applied = cluster.follower.apply(decode_payload(encode_payload(payload)))
    assert applied.loaded == ("big", "small")
    assert cluster.follower.ns["big"] == b"x" * 5000
    assert cluster.follower.sync.hashes == cluster.executor.sync.hashes


def test_a_large_value_through_a_local_directory_store(tmp_path: Path) -> None:
    cluster = Cluster(LocalDirectoryStore(tmp_path / "store", fsync=False), threshold=100)
    cluster.cell("data = list(range(1000))\n")
    assert cluster.follower.ns["data"] == list(range(1000))


def test_the_inline_budget_sends_further_values_to_the_store() -> None:
    cluster = Cluster(threshold=1000, inline_budget=1500)
    result = cluster.cell("a = b'a' * 600\nb = b'b' * 600\nc = b'c' * 600\n")
    assert result.stored == ("c",)
    assert result.inline_bytes < 1500
    assert cluster.follower.synced() == cluster.executor.synced()


def test_a_store_failure_is_reported_and_retried() -> None:
    class FlakyStore(InMemoryStore):
        broken = False

        def put(self, key: str, data: bytes) -> None:
            if self.broken:
                raise StoreError("disk full")
            super().put(key, data)

    store = FlakyStore()
    cluster = Cluster(store, threshold=100)
    cluster.cell("big = 'x' * 1000\n")
    store.broken = True
    result = cluster.cell("big = 'y' * 1000\nok = 1\n")
    assert "disk full" in result.failed["big"]
    assert result.payload is not None
    assert result.payload["unpicklable"] == ["big"]  # followers drop their stale value
    assert "big" not in cluster.follower.ns
    assert cluster.follower.ns["ok"] == 1
    store.broken = False
    result = cluster.executor.capture(3)
    assert shipped(result) == {"big"}
    cluster.follower.apply(result.payload)
    assert cluster.follower.ns["big"] == "y" * 1000


# -- unpicklable values -----------------------------------------------------------------------


def test_unpicklable_values_are_reported_once(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("content\n")
    cluster.executor.ns["path"] = str(path)
    result = cluster.cell(
        "fh = open(path, 'a')\ngen = (i for i in range(3))\nnext(gen)\n"
        "lock = __import__('threading').Lock()\nlock.acquire()\nfine = [1, 2]\n"
    )
    assert result.unpicklable_new == ("fh", "gen", "lock")
    assert result.unpicklable == ("fh", "gen", "lock")
    assert shipped(result) == {"path", "fine"}
    assert cluster.follower.ns["fine"] == [1, 2]
    for name in ("fh", "gen", "lock"):
        assert name not in cluster.follower.ns
    assert cluster.follower.sync.not_synchronized == {"fh", "gen", "lock"}
    # unchanged: no new warning, nothing to ship
    again = cluster.cell("fine.append(3)\n")
    assert again.unpicklable_new == ()
    assert again.unpicklable == ("fh", "gen", "lock")
    assert shipped(again) == {"fine"}
    assert cluster.executor.capture(99).payload is None
    # another unpicklable object under a name already reported: no new warning
    held = "lock = __import__('threading').RLock()\nlock.acquire()\n"
    assert cluster.cell(held).unpicklable_new == ()
    # gone, then back: warned again
    deleted = cluster.cell("del lock\n")
    assert deleted.payload is not None
    assert deleted.payload["del"] == ["lock"]
    assert "lock" not in cluster.follower.sync.not_synchronized
    assert cluster.cell(held).unpicklable_new == ("lock",)
    cluster.executor.ns["fh"].close()


def test_a_name_that_becomes_unpicklable_is_dropped_on_the_follower(cluster: Cluster) -> None:
    cluster.cell("x = 1\n")
    result = cluster.cell("x = (i for i in range(3))\nnext(x)\n")
    assert result.payload is not None
    assert result.payload["unpicklable"] == ["x"]
    assert "x" not in cluster.follower.ns  # not a stale 1
    result = cluster.cell("x = 2\n")
    assert shipped(result) == {"x"}
    assert cluster.follower.ns["x"] == 2
    assert cluster.follower.sync.not_synchronized == frozenset()


def test_open_files_are_reopened_not_read_and_shipped(cluster: Cluster, tmp_path: Path) -> None:
    # cloudpickle alone would ship a file opened for reading as a StringIO of its contents.
    (tmp_path / "f.txt").write_text("line one\nsecret\n")
    with (
        open(tmp_path / "f.txt") as text,
        open(tmp_path / "f.txt", "rb") as binary,
        open(tmp_path / "out.txt", "w") as written,
    ):
        text.readline()
        cluster.executor.ns.update(
            text=text, binary=binary, written=written, memory=io.BytesIO(b"ok")
        )
        result = cluster.executor.capture(1)
        assert result.unpicklable == ("written",)
        assert shipped(result) == {"memory", "text", "binary"}
        payload: Any = result.payload
        assert b"secret" not in b"".join(e["v"] for e in payload["set"])
        cluster.follower.apply(payload)
        copy = cluster.follower.ns["text"]
        try:
            assert copy is not text and copy.readline() == "secret\n"
            assert cluster.follower.ns["binary"].read(4) == b"line"
        finally:
            copy.close()
            cluster.follower.ns["binary"].close()


def test_free_locks_matches_and_weak_references_arrive(cluster: Cluster) -> None:
    cluster.cell(
        "import re, threading, weakref\nlock = threading.Lock()\nrlock = threading.RLock()\n"
        "m = re.search(r'(?<=a)b+', 'xabbb')\nclass T:\n    pass\nt = T()\nref = weakref.ref(t)\n"
    )
    ns = cluster.follower.ns
    assert ns["lock"].acquire(blocking=False) and ns["rlock"].acquire(blocking=False)
    assert (ns["m"].group(0), ns["m"].span()) == ("bbb", (2, 5))
    assert ns["ref"]() is ns["t"]


def test_a_value_referring_to_the_namespace_itself_is_unpicklable(cluster: Cluster) -> None:
    result = cluster.cell("g = globals()\n")
    assert result.unpicklable == ("g",)


# -- follower robustness ----------------------------------------------------------------------


def test_a_value_that_cannot_be_loaded_is_skipped(cluster: Cluster) -> None:
    module = types.ModuleType("nbcluster_test_vanishing")
    exec("def thing():\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        cluster.executor.ns.update(thing=module.thing, other=[1], stale=0)
        cluster.follower.ns["thing"] = "stale value"
        result = cluster.executor.capture(1)
    finally:
        del sys.modules[module.__name__]
    applied = cluster.follower.apply(result.payload)
    assert set(applied.failed) == {"thing"}
    assert "nbcluster_test_vanishing" in applied.failed["thing"]
    assert "thing" not in cluster.follower.ns  # the old value is not left behind
    assert cluster.follower.ns["other"] == [1]
    assert applied.loaded == ("other", "stale")
    # if this replica executes next, its payload removes the name from the others too
    cluster.failover()
    follow_up = cluster.executor.capture(2)
    assert follow_up.payload is not None
    assert follow_up.payload["del"] == ["thing"]


def test_a_value_whose_bytes_do_not_match_their_hash_is_rejected(cluster: Cluster) -> None:
    cluster.executor.ns.update(x=1, y=2)
    payload: Any = cluster.executor.capture(1).payload
    entry_of(payload, "x")["v"] = cloudpickle.dumps(666)
    applied = cluster.follower.apply(payload)
    assert "hash mismatch" in applied.failed["x"]
    assert "x" not in cluster.follower.ns
    assert cluster.follower.ns["y"] == 2


def test_a_pointer_to_a_missing_object_is_reported(cluster: Cluster) -> None:
    payload = {
        "count": 1,
        "set": [{"slots": ["gone"], "h": "0" * 32, "ptr": "sync/nothing-here", "size": 10}],
        "del": [],
    }
    applied = cluster.follower.apply(payload)
    assert "ObjectNotFoundError" in applied.failed["gone"]
    assert "sync/nothing-here" in applied.failed["gone"]


def test_a_corrupt_stored_object_is_reported(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path, fsync=False)
    cluster = Cluster(store, threshold=10)
    cluster.executor.ns["big"] = "x" * 100
    payload: Any = cluster.executor.capture(1).payload
    key = entry_of(payload, "big")["ptr"]
    file = tmp_path.joinpath(*key.split("/"))
    file.write_bytes(file.read_bytes()[:-1] + b"!")
    applied = cluster.follower.apply(payload)
    assert "ObjectCorruptedError" in applied.failed["big"]
    assert key in applied.failed["big"]


def test_a_payload_setting_machinery_names_is_not_applied(cluster: Cluster) -> None:
    cluster.follower.ns["get_ipython"] = marker = object()
    cluster.follower.ns["__builtins__"] = builtins_dict = {}
    data = {n: cloudpickle.dumps(((n,), (1,))) for n in ("get_ipython", "_i3", "fine")}
    payload = {
        "count": 1,
        "set": [{"slots": [n], "h": _hash(d), "v": d} for n, d in data.items()],
        "del": ["__builtins__"],
    }
    applied = cluster.follower.apply(payload)
    assert set(applied.failed) == {"get_ipython", "_i3", "__builtins__"}
    assert cluster.follower.ns["get_ipython"] is marker
    assert cluster.follower.ns["__builtins__"] is builtins_dict
    assert cluster.follower.ns["fine"] == 1


def test_applying_a_payload_twice_or_on_its_executor_changes_nothing(cluster: Cluster) -> None:
    cluster.executor.run("x = [1]\ndef f():\n    return x\n", "<c1>")
    payload = cluster.executor.capture(1).payload
    before = dict(cluster.executor.ns)
    own = cluster.executor.apply(payload)
    assert own.loaded == () and own.deleted == () and own.failed == {}
    assert all(cluster.executor.ns[k] is v for k, v in before.items())
    first = cluster.follower.apply(payload)
    second = cluster.follower.apply(payload)
    assert first.loaded == ("f", "x")
    assert second.loaded == ()


def test_follower_takes_over_and_ships_only_real_changes(cluster: Cluster) -> None:
    cluster.cell(
        "words = {'alpha', 'beta', 'gamma', 'delta', 'self', 'x'}\n"
        "n = 5\nlst = [1, 2]\n"
        "def f(v):\n    '''doc'''\n    return v + n\n"
        "class K:\n    def m(self):\n        return 'm'\n"
        "k = K()\nimport json\n"
    )
    assert cluster.follower.sync.hashes == cluster.executor.sync.hashes
    cluster.failover()
    assert shipped(cluster.executor.capture(2)) == set()
    result = cluster.cell("lst.append(3)\nk2 = K()\n")
    assert shipped(result) == {"lst", "k2"}
    # the old executor, now a follower, applies the new executor's changes
    assert cluster.follower.ns["lst"] == [1, 2, 3]
    assert isinstance(cluster.follower.ns["k2"], cluster.follower.ns["K"])
    assert cluster.follower.sync.hashes == cluster.executor.sync.hashes


def test_a_full_payload_replaces_the_state(cluster: Cluster) -> None:
    cluster.cell("a = 1\nb = 2\n")
    cluster.follower.ns["extra"] = "left over"
    data = cloudpickle.dumps((("a",), (10,)))
    payload = {
        "count": 9,
        "set": [{"slots": ["a"], "h": _hash(data), "v": data}],
        "del": [],
        "full": True,
    }
    applied = cluster.follower.apply(payload)
    assert applied.deleted == ("b", "extra")
    assert cluster.follower.synced() == {"a": 10}
    assert cluster.follower.sync.hashes == {"a": _hash(data)}


# -- sources ---------------------------------------------------------------------------------


def test_follower_registers_the_cell_source_for_inspect_and_tracebacks(cluster: Cluster) -> None:
    source = "def explode(v):\n    return 1 / v\n\ndef twice(v):\n    return 2 * v\n"
    filename = cluster.filename(1)
    linecache.cache.pop(filename, None)
    cluster.executor.run(source, filename)
    payload: Any = cluster.executor.capture(1, source, filename).payload
    assert payload["source"] == source
    assert payload["filename"] == filename
    assert filename not in linecache.cache  # as on a replica in another process
    cluster.follower.apply(payload)
    ns = cluster.follower.ns
    assert inspect.getsource(ns["twice"]) == "def twice(v):\n    return 2 * v\n"
    try:
        ns["explode"](0)
    except ZeroDivisionError:
        text = traceback.format_exc()
    assert "return 1 / v" in text


# -- property ---------------------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c", "d", "e"])
_ops = st.one_of(
    st.tuples(st.just("set"), _names, json_values),
    st.tuples(st.just("del"), _names, st.none()),
    st.tuples(st.just("append"), _names, json_values),
)
#: a cell: whether the other replica executes it (failover first), and its operations
_cells = st.tuples(st.booleans(), st.lists(_ops, max_size=5))


@fast
@given(cells=st.lists(_cells, max_size=8))
def test_followers_converge_to_the_executor(cells: list[tuple[bool, list[Any]]]) -> None:
    cluster = Cluster(threshold=200)  # some values go through the store
    for count, (failover, ops) in enumerate(cells, 1):
        if failover:
            cluster.failover()
        ns = cluster.executor.ns
        for op, name, value in ops:
            if op == "set":
                ns[name] = value
            elif op == "del":
                ns.pop(name, None)
            elif op == "append" and isinstance(ns.get(name), list):
                ns[name].append(value)
        result = cluster.executor.capture(count)
        if result.payload is not None:
            cluster.follower.apply(decode_payload(encode_payload(result.payload)))
        assert cluster.follower.synced() == cluster.executor.synced()
        assert cluster.follower.sync.hashes == cluster.executor.sync.hashes
        assert cluster.executor.capture(count).payload is None


# -- IPython ----------------------------------------------------------------------------------


@pytest.fixture
def shells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    executor = InteractiveShell(config=config)
    follower = InteractiveShell(config=config)
    try:
        yield executor, follower
    finally:
        follower.cleanup()
        executor.cleanup()


def test_real_ipython_shells(shells: tuple[Any, Any]) -> None:
    executor, follower = shells
    store = InMemoryStore()
    exe = Replica(store)
    fol = Replica(store)
    exe.ns, fol.ns = executor.user_ns, follower.user_ns
    exe.sync = StateSynchronizer(executor.user_ns, executor.user_ns_hidden, store)
    fol.sync = StateSynchronizer(follower.user_ns, follower.user_ns_hidden, store)
    cells = [
        "import json\nfrom collections import OrderedDict\nbase = 10\n",
        "def add(v):\n    '''Add base.'''\n    return v + base\n\nclass Box:\n    def __init__(self, v):\n        self.v = v\n",
        "box = Box(add(1))\nboxes = [Box(i) for i in range(3)]\nbox.v\n",
        "names = %who_ls\nwho = get_ipython()\n",
    ]
    filenames = []
    for source in cells:
        count = executor.execution_count
        with exe.active():
            executor.run_cell(source, store_history=True)
        transformed = executor.transform_cell(source)
        filename = executor.compile.get_code_name(source, transformed, count)
        filenames.append(filename)
        result = exe.capture(count, transformed, filename)
        if result.payload is None:
            continue
        names = shipped(result)
        assert not names & {"In", "Out", "_i1", "_1", "get_ipython", "exit", "quit"}
        # the follower is another process: it has none of the executor's cells cached
        linecache.cache.pop(filename, None)
        applied = fol.apply(decode_payload(encode_payload(result.payload)))
        assert applied.failed == {}
    assert exe.sync.hashes == fol.sync.hashes
    assert "who" not in fol.ns  # the shell itself does not pickle
    assert exe.sync.capture(99).unpicklable == ("who",)
    ns = follower.user_ns
    assert ns["add"].__globals__ is ns
    assert ns["add"].__code__.co_filename == filenames[1]
    assert "add" in ns["names"]  # the magic's result (the transformed cell) was synchronised
    assert inspect.getsource(ns["add"]) == (
        "def add(v):\n    '''Add base.'''\n    return v + base\n"
    )
    with fol.active():
        outcome = follower.run_cell(
            "total = add(box.v) + sum(b.v for b in boxes)\nok = isinstance(box, Box)\n"
            "text = json.dumps(OrderedDict(t=total))\n"
        )
    assert outcome.success
    assert ns["total"] == 24
    assert ns["ok"] is True
    assert ns["text"] == '{"t": 24}'
