"""The gateway's modules form layers: no import circle among them, and no module over ~500
lines without a reason written at its top."""

from __future__ import annotations

import ast
from pathlib import Path

import nbcluster

SRC = Path(nbcluster.__file__).parent
GATEWAY = SRC / "gateway"


def _gateway_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports at run time (not under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return found


def test_no_import_circle_among_the_gateway_modules() -> None:
    graph = {p.stem: _gateway_imports(p) for p in GATEWAY.glob("*.py")}
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            assert state.get(target) != "open", " -> ".join([*path, target])
            if target not in state:
                walk(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)


def test_kernel_manager_modules_stay_small_or_say_why() -> None:
    for name in (
        "_manager",
        "_kernel",
        "_execution",
        "_launcher",
        "_host_launcher",
        "_replicas",
        "_membership",
        "_recovery",
        "_reclaim",
        "_reconcile",
        "_replies",
    ):
        text = (GATEWAY / f"{name}.py").read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 500:
            assert "500 lines" in docstring, f"{name}.py is long and does not say why"
