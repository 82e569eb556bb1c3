"""Rebuilding incomplete copies by running their cell again on the replica that takes over
(``kernel/_recompute``, ``_cell_reads``): what a cell reads, which cells qualify, and the
rebuild itself with an autograd graph."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from nbcluster.kernel._cell_reads import free_reads, side_effect
from nbcluster.kernel._payload import validate_payload
from nbcluster.kernel._recompute import Pending, Rerun, rerun

from .test_sync_identity import run_and_apply


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("z = x @ w\nprint(z)\n", {"x", "w", "print"}),
        ("x = x + 1\n", {"x"}),
        ("n += 1\n", {"n"}),
        ("with torch.no_grad():\n    q = z * 2\nprint(q)\n", {"torch", "z", "print"}),
        ("for i in range(3):\n    t = i + k\n", {"range", "k"}),
        ("if c:\n    y = 1\nprint(y)\n", {"c", "print", "y"}),
        ("def f(a):\n    b = a + g\n    return b\nr = f(1)\n", {"g"}),
        ("squares = [v * v for v in data if v > lim]\n", {"data", "lim"}),
        ("class C(Base):\n    size = n\n", {"Base", "n"}),
        ("import torch\nt = torch.ones(2)\n", set()),
    ],
)
def test_free_reads_follow_statement_order(source: str, reads: set[str]) -> None:
    assert free_reads(source) == frozenset(reads)


def test_free_reads_of_a_cell_that_does_not_parse_is_unknown() -> None:
    assert free_reads("x = (") is None


def _notebook_function(source: str, name: str, namespace: dict[str, Any]) -> Any:
    namespace.setdefault("__name__", "__main__")
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("f = open('data.csv')\n", "open()"),
        ("import os\nx = os.getcwd()\n", "import os"),
        ("df.to_csv('out.csv')\n", ".to_csv()"),
        ("plt.show()\n", ".show()"),
        ("get_ipython().run_line_magic('who', '')\n", "get_ipython()"),
        ("loss = model(x).sum()\n", None),
    ],
)
def test_side_effects_are_found_in_the_cell(source: str, found: str | None) -> None:
    assert side_effect(source, {}) == found


def test_side_effects_are_found_in_the_notebook_code_a_cell_calls() -> None:
    import os

    namespace: dict[str, Any] = {"os": os}
    _notebook_function("def listing():\n    return os.listdir('.')\n", "listing", namespace)
    found = side_effect("files = listing()\n", namespace)
    assert found is not None and "listing" in found and "os" in found
    _notebook_function(
        "class Model:\n    def forward(self):\n        return open('w.bin').read()\n",
        "Model",
        namespace,
    )
    namespace["model"] = namespace["Model"]()
    found = side_effect("y = model\n", namespace)
    assert found is not None and "forward" in found
    _notebook_function("def pure(a):\n    return a * 2\n", "pure", namespace)
    assert side_effect("y = pure(3)\n", namespace) is None


def test_payload_fields_are_validated() -> None:
    base = {"count": 1, "set": [], "del": []}
    good = {"binds": {"z": "0" * 32}, "reads": {"x": "1" * 32}, "before": b""}
    assert validate_payload({**base, "recompute": good, "lossy": ["z"]})["recompute"] == good
    with pytest.raises(ValueError, match="recompute"):
        validate_payload({**base, "recompute": {"binds": {}, "reads": {}}})
    with pytest.raises(ValueError, match="32-hex"):
        validate_payload({**base, "recompute": {**good, "binds": {"z": "nope"}}})
    with pytest.raises(ValueError, match="lossy"):
        validate_payload({**base, "lossy": "z"})


@contextlib.contextmanager
def _no_state(encoded: bytes) -> Iterator[None]:
    yield


def _pending(source: str, binds: list[str]) -> Pending:
    record = {"binds": dict.fromkeys(binds, "0" * 32), "reads": {}, "before": b""}
    return Pending(3, source, "<cell-3>", record, tuple(binds))  # type: ignore[arg-type]


def test_a_rerun_that_gives_another_value_leaves_the_namespace_as_it_was() -> None:
    namespace: dict[str, Any] = {"z": 1, "keep": "x"}
    with pytest.raises(Rerun, match="another value for z"):
        rerun(
            _pending("z = 2\nkeep = 'y'\n", ["z", "keep"]),
            namespace,
            _no_state,
            lambda a, b: a == b,
        )
    namespace.pop("__builtins__", None)  # (exec adds it)
    assert namespace == {"z": 1, "keep": "x"}


def test_a_rerun_that_raises_restores_and_says_why() -> None:
    namespace: dict[str, Any] = {"z": 1}
    with pytest.raises(Rerun, match="ZeroDivisionError"):
        rerun(_pending("z = 2\nw = 1 / 0\n", ["z", "w"]), namespace, _no_state, lambda a, b: True)
    assert namespace["z"] == 1 and "w" not in namespace


def test_a_rerun_discards_its_output(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {"z": 2}
    rebuilt = rerun(
        _pending("print('noisy')\nz = 2\n", ["z"]), namespace, _no_state, lambda a, b: a == b
    )
    assert rebuilt == {"z": 2}
    assert "noisy" not in capsys.readouterr().out


GRAPH_CELL = (
    "x = torch.ones(5)\n"
    "w = torch.randn(5, 3, requires_grad=True)\n"
    "b = torch.randn(3, requires_grad=True)\n"
    "z = torch.matmul(x, w) + b\n"
    "loss = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.zeros(3))\n"
)


def test_an_autograd_graph_is_rebuilt_by_the_replica_that_takes_over(
    shells: tuple[Any, Any],
) -> None:
    pytest.importorskip("torch")
    executor, follower = shells
    fol = run_and_apply(shells, ["import torch\n", GRAPH_CELL, "print(loss.grad_fn)\n"])
    ns = follower.user_ns
    assert ns["loss"].grad_fn is None  # the copy is incomplete until the takeover
    notices = fol.rebuild_incomplete()
    assert len(notices) == 1 and "rebuilt" in notices[0] and "loss, z" in notices[0]
    assert ns["loss"].grad_fn is not None
    # the rebuilt values are known as the ones shipped: a cell that mentions them next does
    # not ship them again (which would make the plan stale on the other replicas)
    follower.run_cell("print(loss.grad_fn, z.grad_fn)\n", store_history=True)
    after = fol.capture(4, "print(loss.grad_fn, z.grad_fn)\n", "<cell-4>")
    assert after.payload is None or not {"loss", "z"} & {
        slot for entry in after.payload["set"] for slot in entry["slots"]
    }
    ns["loss"].backward()
    executor.run_cell("loss.backward()")
    expected = executor.user_ns["w"].grad
    assert ns["w"].grad is not None and bool((ns["w"].grad == expected).all())
    assert fol.rebuild_incomplete() == []  # done once


def test_a_cell_whose_inputs_changed_later_is_not_run_again(
    shells: tuple[Any, Any],
) -> None:
    pytest.importorskip("torch")
    fol = run_and_apply(
        shells, ["import torch\n", GRAPH_CELL, "with torch.no_grad():\n    w.add_(1)\n"]
    )
    assert fol.rebuild_incomplete() == []
    assert shells[1].user_ns["loss"].grad_fn is None


@pytest.mark.parametrize(
    "cell",
    [
        "history.append(1)\n" + GRAPH_CELL,  # changes a name it does not bind
        "z = z * w\n",  # z read before it is bound, and it existed
        "f = open(torch.__file__)\n" + GRAPH_CELL,  # a side effect
    ],
)
def test_cells_that_are_not_safe_to_run_again_are_not_planned(
    shells: tuple[Any, Any], cell: str
) -> None:
    pytest.importorskip("torch")
    setup = "import torch\nhistory = []\nw = torch.ones(5, requires_grad=True)\nz = torch.ones(1)\n"
    executor, _ = shells
    from nbcluster.kernel._sync import StateSynchronizer
    from nbcluster.store import InMemoryStore

    sync = StateSynchronizer(
        executor.user_ns, executor.user_ns_hidden, InMemoryStore(), shell=executor
    )
    for count, source in enumerate([setup, cell], start=1):
        executor.run_cell(source, store_history=True)
        result = sync.capture(count, source, f"<cell-{count}>", raw=source)
    assert result.lossy  # something arrives incomplete ...
    assert result.recomputable == ()  # ... and the cell is not run again
    assert result.payload is not None and "recompute" not in result.payload
