"""The import graph of ``src/nbcluster``, read from each module's AST (nothing is imported).

Which imports count:

* module-level imports, and imports inside functions and methods: a function-level import is
  still a dependency at run time (it is how a circle is usually hidden, not broken);
* not imports under ``if TYPE_CHECKING:``: they exist for annotations only and never run.

``from .x import y`` is an edge to the module ``x.y`` when that is a module, else to ``x``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import nbcluster

SRC = Path(nbcluster.__file__).parent


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    in_function: bool


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, whether it is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def packages() -> list[str]:
    """``nbcluster`` and every package under it, from the filesystem."""
    return sorted(name for name, (_, is_package) in modules().items() if is_package)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, known: dict[str, tuple[Path, bool]]) -> list[Import]:
    """The nbcluster modules that module ``name`` imports (see the module docstring)."""
    path, is_package = known[name]
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.stmt, in_function: bool) -> None:
        if target in known and target != name:
            found.append(Import(target, node.lineno, in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_statement(other, in_function)
                continue
            visit_statement(child, in_function)

    def visit_statement(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                add(alias.name, child, in_function)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")[: len(package.split(".")) - child.level + 1]
                module = ".".join([*base, *([child.module] if child.module else [])])
            else:
                module = child.module or ""
            for alias in child.names:
                submodule = f"{module}.{alias.name}"
                add(submodule if submodule in known else module, child, in_function)
        else:
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return found


def graph() -> dict[str, list[Import]]:
    known = modules()
    return {name: imports_of(name, known) for name in known}
