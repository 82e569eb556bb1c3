"""No import circle among the modules of ``src/nbcluster`` (which imports count: see
``module_graph``: module- and function-level ones do, ``TYPE_CHECKING`` ones do not)."""

from __future__ import annotations

from .module_graph import Import, graph, imports_of, modules, packages


def _circles(edges: dict[str, list[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _edges(imports: dict[str, list[Import]]) -> dict[str, list[str]]:
    # A package's __init__ importing its own modules, and a module importing its package
    # (``from . import x``) is how packages are built: an edge from a module to one of its
    # ancestor packages is not followed.
    return {
        name: sorted({i.target for i in found if not name.startswith(i.target + ".")})
        for name, found in imports.items()
    }


def test_no_import_circle() -> None:
    circles = _circles(_edges(graph()))
    assert not circles, "import circles among nbcluster modules:\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_finder_finds_circles() -> None:
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e"]}
    assert _circles(edges) == [["a", "b", "c"]]
    assert _circles({"a": ["b"], "b": []}) == []


def test_the_graph_reads_function_level_imports_and_skips_type_checking_ones() -> None:
    known = modules()
    group = {i.target: i for i in imports_of("nbcluster.kernel._group", known)}
    # Imported inside ReplicaGroup.start (counts), never under TYPE_CHECKING.
    assert group["nbcluster.kernel._sync"].in_function
    assert "nbcluster.kernel._kernel" not in group
    assert "nbcluster.consensus" in group
    kernel = {i.target for i in imports_of("nbcluster.kernel._kernel", known)}
    assert "nbcluster.kernel._group" in kernel


def test_packages_come_from_the_filesystem() -> None:
    found = packages()
    assert "nbcluster" in found and "nbcluster.gateway" in found and "nbcluster.jobs" in found
