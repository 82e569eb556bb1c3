"""Identity-preserving synchronisation, and the Python patterns that used to be lost: each cell
runs on the executor, its payload goes through msgpack to the follower, then the follower takes
over (a failover) and must have the same values *and* the same sharing among names."""

from __future__ import annotations

import inspect
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from nbcluster.kernel._touched import analyse_cell
from nbcluster.store import InMemoryStore

from .test_sync import Cluster, Replica, shipped


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def after_failover(cluster: Cluster, *cells: str) -> dict[str, Any]:
    for cell in cells:
        cluster.cell(cell)
    cluster.failover()
    return cluster.executor.ns


def test_aliases_views_bound_methods_closures_and_sentinels_keep_their_identity(
    cluster: Cluster,
) -> None:
    ns = after_failover(
        cluster,
        "a = [1]\nb = a\nSENTINEL = object()\nx = SENTINEL\nitems = []\nadd = items.append\n",
        "def make():\n    count = 0\n    def inc():\n        nonlocal count\n        count += 1\n"
        "        return count\n    def get():\n        return count\n    return inc, get\n"
        "inc, get = make()\n",
        "a.append(2)\n",
    )
    assert ns["a"] is ns["b"] and ns["b"] == [1, 2]
    assert ns["x"] is ns["SENTINEL"]
    ns["add"](5)
    assert ns["items"] == [5]
    assert ns["inc"]() == 1 and ns["get"]() == 1


def test_a_new_object_referring_to_one_followers_already_have(cluster: Cluster) -> None:
    cluster.cell("config = {'lr': 0.1}\n")
    result = cluster.cell(
        "class Run:\n    def __init__(self, c):\n        self.c = c\nrun = Run(config)\n"
    )
    # config is shipped again with run, in one pickle, so that the two still share it
    assert {"config", "run"} <= shipped(result)
    cluster.failover()
    ns = cluster.executor.ns
    assert ns["run"].c is ns["config"]


def test_numpy_view_and_its_array_share_memory() -> None:
    np = pytest.importorskip("numpy")
    cluster = Cluster()
    ns = after_failover(cluster, "import numpy as np\narr = np.arange(10.0)\nview = arr[2:5]\n")
    ns["view"][0] = 99.0
    assert ns["arr"][2] == 99.0
    assert isinstance(ns["view"], np.ndarray)


def test_a_model_and_its_optimizer_keep_training_after_a_failover() -> None:
    pytest.importorskip("torch")
    cluster = Cluster()
    ns = after_failover(
        cluster,
        "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n",
    )
    model, opt = ns["model"], ns["opt"]
    assert opt.param_groups[0]["params"][0] is model.weight
    before = model.weight.detach().clone()
    import torch

    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.weight.detach())


def test_decorated_functions_and_typing_objects_arrive(cluster: Cluster) -> None:
    ns = after_failover(
        cluster,
        "import functools, typing\n"
        "@functools.lru_cache\ndef square(x):\n    return x * x\n"
        "@functools.cache\ndef cube(x):\n    return x ** 3\n"
        "class M:\n    @functools.lru_cache(maxsize=4)\n    def plus(self, x):\n        return x + 1\n"
        "    @functools.cached_property\n    def answer(self):\n        return 42\n"
        "@functools.singledispatch\ndef show(x):\n    return 'object'\n"
        "@show.register\ndef _(x: int):\n    return 'int'\n"
        "UserId = typing.NewType('UserId', int)\nT = typing.TypeVar('T')\n"
        "class Box(typing.Generic[T]):\n    def __init__(self, v: T):\n        self.v = v\n"
        "box = Box[int](3)\n",
    )
    assert ns["square"](3) == 9 and ns["square"].cache_info().maxsize == 128
    assert ns["cube"](2) == 8
    assert ns["M"]().plus(1) == 2 and ns["M"]().answer == 42
    assert ns["show"](1) == "int" and ns["show"]("s") == "object"
    assert ns["UserId"](5) == 5 and ns["UserId"].__supertype__ is int
    assert ns["box"].v == 3


def test_slots_private_names_deep_structures_and_exceptions(cluster: Cluster) -> None:
    result = cluster.cell(
        "class S:\n    __slots__ = ('a', 'b')\n    def __init__(self):\n"
        "        self.a, self.b = 1, [2]\ns = S()\n_hidden = [1]\n"
        "class Node:\n    def __init__(self, n):\n        self.next = n\n"
        "head = None\nfor i in range(5000):\n    head = Node(head)\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    err = e\n"
    )
    assert result.unpicklable == ()
    assert "traceback" in result.lossy["err"]  # announced, not silently lost
    cluster.failover()
    ns = cluster.executor.ns
    assert (ns["s"].a, ns["s"].b) == (1, [2])
    assert ns["_hidden"] == [1]
    depth, node = 0, ns["head"]
    while node is not None:
        depth, node = depth + 1, node.next
    assert depth == 5000
    assert isinstance(ns["err"], ZeroDivisionError)


def test_submodules_and_monkeypatched_module_attributes(cluster: Cluster) -> None:
    import json

    source = "import xml.dom.minidom\nimport json\njson.nbcluster_flag = 'patched'\n"
    try:
        cluster.executor.run(source, "<c1>")
        result = cluster.executor.capture(1, source, "<c1>")
        assert "@json:nbcluster_flag" in shipped(result)
        # the follower is another process: it has neither the attribute nor the submodule
        del json.nbcluster_flag  # type: ignore[attr-defined]
        minidom = sys.modules.pop("xml.dom.minidom")
        del sys.modules["xml.dom"].minidom  # type: ignore[attr-defined]
        assert result.payload is not None
        cluster.follower.apply(result.payload)
        assert json.nbcluster_flag == "patched"  # type: ignore[attr-defined]
        assert cluster.follower.ns["xml"].dom.minidom.parseString("<a/>").documentElement
        assert sys.modules["xml.dom.minidom"] is not minidom  # imported again on load
    finally:
        if hasattr(json, "nbcluster_flag"):
            del json.nbcluster_flag


def test_a_user_module_file_and_its_state_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cluster = Cluster()
    (tmp_path / "nbc_usermod.py").write_text(
        "REGISTRY = []\ndef register(x):\n    REGISTRY.append(x)\n"
    )
    try:
        result = cluster.cell("import nbc_usermod\nnbc_usermod.register(1)\n")
        payload = result.payload
        assert payload is not None
        assert [f["path"] for f in payload["files"]] == ["nbc_usermod.py"]
        result = cluster.cell("nbc_usermod.register(2)\n")
        assert "@nbc_usermod:REGISTRY" in shipped(result)
        # another host: the file is not there until the payload writes it
        (tmp_path / "nbc_usermod.py").unlink()
        del sys.modules["nbc_usermod"]
        fresh = Replica(cluster.store)
        state = cluster.executor.sync
        for count in (1, 2):
            fresh.apply(
                {
                    "count": count,
                    "set": [],
                    "del": [],
                    "files": payload["files"] if count == 1 else [],
                }
            )
        assert (tmp_path / "nbc_usermod.py").read_text().startswith("REGISTRY")
        assert state is not None
    finally:
        sys.modules.pop("nbc_usermod", None)


def test_trivial_cells_examine_nothing_next_to_big_values(cluster: Cluster) -> None:
    cluster.cell("big = list(range(200_000))\nsmall = [1]\ndef f():\n    return small\n")
    assert cluster.cell("1 + 1\n").examined == 0
    result = cluster.cell("f()\n")
    assert result.examined == 2  # f, and small because f's code names it
    result = cluster.cell("small.append(2)\n")
    assert shipped(result) == {"small"}
    # code that can reach any global: everything is examined
    assert cluster.cell("globals()['small'].append(3)\n").examined >= 3
    assert cluster.follower.ns["small"] == [1, 2, 3]


def test_a_method_of_a_notebook_class_that_changes_a_global(cluster: Cluster) -> None:
    cluster.cell(
        "log = []\nclass Model:\n    def fit(self):\n        log.append('fit')\nm = Model()\n"
    )
    result = cluster.cell("m.fit()\n")
    assert "log" in shipped(result)
    assert cluster.follower.ns["log"] == ["fit"]


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("1 + 1", frozenset()),
        ("x = y + 1", frozenset({"x", "y"})),
        ("def f():\n    global g\n    g = 1", frozenset({"f", "g"})),
        ("import numpy as np", frozenset({"np"})),
        ("get_ipython().run_line_magic('precision', '3')", frozenset()),
        ("get_ipython().run_line_magic('time', 'z = w * 2')", frozenset({"z", "w"})),
        ("get_ipython().system('ls')", frozenset()),
        ("exec('x = 1')", None),
        ("globals()['x'] = 1", None),
        ("from os import *", None),
        ("get_ipython().run_line_magic('load_ext', 'autoreload')", None),
        ("get_ipython().user_ns['x'] = 1", None),
        ("def broken(:", None),
    ],
)
def test_what_a_cell_can_touch(source: str, names: frozenset[str] | None) -> None:
    assert analyse_cell(source).names == names


def test_module_attribute_stores_are_found() -> None:
    effects = analyse_cell("json.flag = 1\npd.DataFrame.nice = f\nsetattr(np, 'x', 2)\n")
    assert set(effects.attribute_stores) == {
        ("json", ("flag",)),
        ("pd", ("DataFrame", "nice")),
        ("np", ("x",)),
    }


# -- IPython history and interpreter state ------------------------------------------------------


def run_and_apply(shells: tuple[Any, Any], cells: list[str]) -> Any:
    """Run cells on the executor shell, each one's payload applied on the follower (through
    msgpack, as in the log); returns the follower's synchroniser."""
    from nbcluster.kernel._sync import StateSynchronizer, decode_payload, encode_payload

    executor, follower = shells
    store = InMemoryStore()
    exe = StateSynchronizer(executor.user_ns, executor.user_ns_hidden, store, shell=executor)
    fol = StateSynchronizer(follower.user_ns, follower.user_ns_hidden, store, shell=follower)
    for source in cells:
        count = executor.execution_count
        executor.run_cell(source, store_history=True)
        transformed = executor.transform_cell(source)
        result = exe.capture(count, transformed, f"<cell-{count}>", raw=source)
        assert result.payload is not None
        fol.apply(decode_payload(encode_payload(result.payload)))
    return fol


def test_history_and_interpreter_state_follow_the_executor(shells: tuple[Any, Any]) -> None:
    executor, follower = shells
    cells = ["x = [1, 2]\nx\n", "import random\nrandom.seed(7)\n", "y = 3\ny\n"]
    fol = run_and_apply(shells, cells)
    ns = follower.user_ns
    assert ns["Out"][1] is ns["x"] and ns["_1"] is ns["x"]
    assert ns["_"] == 3 and ns["__"] is ns["x"]
    assert ns["In"][1] == "x = [1, 2]\nx" and ns["_i3"] == "y = 3\ny\n".rstrip("\n")
    assert fol.environment.restore_pending() == []
    # the seeded generator continues where the executor's would
    expected = random.Random(7).random()
    assert random.random() == expected
    # the follower runs the next cell with the numbering and history of the executor
    follower.execution_count = executor.execution_count
    outcome = follower.run_cell("z = x + [y]\nz\n", store_history=True)
    assert outcome.success and ns["z"] == [1, 2, 3]
    assert ns["Out"][4] == [1, 2, 3] and ns["__"] == 3


def test_functions_keep_their_source_after_a_failover(cluster: Cluster) -> None:
    source = "def twice(v):\n    return 2 * v\n"
    cluster.cell(source)
    cluster.failover()
    func = cluster.executor.ns["twice"]
    assert func.__code__.co_filename == cluster.filename(1)
    assert inspect.getsource(func) == source


def test_generators_not_started_are_rebuilt_and_context_vars_keep_their_value(
    cluster: Cluster,
) -> None:
    result = cluster.cell(
        "data = [1, 2, 3]\nsquares = (x * x for x in data)\n"
        "def count(n, *rest, step=1, **extra):\n    i = 0\n    while i < n:\n        yield i\n"
        "        i += step\nevens = count(5, 9, step=2, z=1)\nstarted = count(3)\nnext(started)\n"
        "import contextvars\nvar = contextvars.ContextVar('var', default=0)\nvar.set(7)\n"
    )
    assert result.unpicklable == ("started",)  # a suspended frame cannot be rebuilt
    assert result.lossy == {}
    ns = after_failover(cluster)
    with cluster.executor.active():
        assert list(ns["squares"]) == [1, 4, 9]
        assert list(ns["evens"]) == [0, 2, 4]
    assert ns["var"].get() == 7
    assert "started" not in ns


def test_pickling_does_not_change_what_the_notebook_sees() -> None:
    """Capturing a cell must not be observable: matplotlib's callback ids keep their sequence."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    from nbcluster.kernel._pickling import dumps

    fig, ax = pyplot.subplots()
    try:
        first = fig.canvas.mpl_connect("draw_event", lambda event: None)
        for _ in range(3):
            dumps((fig, ax), None, lambda name: False)
        assert fig.canvas.mpl_connect("draw_event", lambda event: None) == first + 1
    finally:
        pyplot.close(fig)


def test_raft_timeouts_do_not_draw_from_the_notebooks_random_generator() -> None:
    import pysyncobj.syncobj

    from nbcluster.consensus import private_random_for_pysyncobj

    private_random_for_pysyncobj()
    state = random.getstate()
    try:
        random.seed(42)
        expected = random.Random(42).random()
        pysyncobj.syncobj.random.random()  # what an election timeout draws
        assert random.random() == expected
    finally:
        random.setstate(state)


def test_the_notebooks_magics_event_callbacks_and_settings_follow(shells: tuple[Any, Any]) -> None:
    follower = shells[1]
    cells = [
        "from IPython.core.magic import register_line_magic\n"
        "@register_line_magic\ndef shout(line):\n    return line.upper()\n"
        "ran = []\ndef count_cells(result):\n    ran.append(1)\n"
        "get_ipython().events.register('post_run_cell', count_cells)\n",
        "%xmode Minimal\n",
        "import warnings\nwarnings.filterwarnings('error', message='strict')\n",
    ]
    import warnings

    saved_filters = list(warnings.filters)
    try:
        fol = run_and_apply(shells, cells)
        assert fol.environment.restore_pending() == []
        assert follower.run_line_magic("shout", "hi") == "HI"
        follower.run_cell("1 + 1", store_history=True)
        assert follower.user_ns["ran"] == [1, 1, 1, 1]  # 3 on the executor, 1 here
        assert follower.InteractiveTB.mode == "Minimal"
        with pytest.raises(UserWarning):
            warnings.warn("strict", stacklevel=1)
    finally:
        warnings.filters[:] = saved_filters
        warnings._filters_mutated()  # type: ignore[attr-defined]


def test_torch_views_and_gradients_and_pandas_copy_on_write() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("pandas")
    cluster = Cluster()
    ns = after_failover(
        cluster,
        "import torch, pandas as pd\ntorch.manual_seed(0)\nX = torch.randn(4, 3)\n"
        "flat = X.view(-1)\nmodel = torch.nn.Linear(3, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)\n"
        "model(X).sum().backward()\nopt.step()\n"
        "df = pd.DataFrame({'v': [1, 2, 3]})\ncol = df['v']\n",
    )
    ns["flat"][0] = 100.0
    assert ns["X"][0, 0].item() == 100.0  # still a view
    assert ns["model"].weight.grad is not None  # torch's own pickling drops it
    assert ns["opt"].param_groups[0]["params"][0] is ns["model"].weight
    ns["df"].loc[0, "v"] = 100
    assert ns["col"][0] == 1  # copy on write, as in the local kernel


def test_underscores_stay_the_outputs_they_are(shells: tuple[Any, Any]) -> None:
    executor, follower = shells
    run_and_apply(shells, ["1 / 3\n", "2 / 3\n", "x = 1\n"])
    ns = follower.user_ns
    assert ns["_"] is ns["Out"][2] and ns["__"] is ns["Out"][1]  # floats: one object each
    follower.execution_count = executor.execution_count
    follower.run_cell("5 / 7\n", store_history=True)
    assert ns["_"] == 5 / 7 and ns["__"] == 2 / 3  # IPython still updates them
