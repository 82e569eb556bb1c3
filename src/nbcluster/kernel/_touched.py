"""What a cell can have changed, read from its source: the names it mentions and the module
attributes it assigns. Pure functions; called by :class:`~._sync.StateSynchronizer` with the
cell as IPython transformed it (magics become ``get_ipython().run_line_magic(...)`` calls).

A cell changes the user namespace only through names it mentions (loads, stores, deletes,
``global`` statements in functions it defines), through the objects those names reach, and
through code those objects run (the synchroniser widens the set with the names used by the
functions and methods it reaches). A few constructs can reach any global without naming it:
``globals()``, ``vars()``, ``locals()``, ``exec``, ``eval``, ``__import__``, ``__main__``,
and IPython magics that run arbitrary code; for those the analysis answers "anything"
(``names is None``) and the synchroniser looks at every name. ``docs/replication.md`` has the
argument in full.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

__all__ = ["CellEffects", "analyse_cell", "bound_names"]

#: Builtins through which a cell reaches globals it does not name.
_DYNAMIC_NAMES = frozenset(
    {"globals", "vars", "locals", "exec", "eval", "execfile", "__import__", "__main__", "runfile"}
)

#: IPython magics that change no user global except through names the cell names, and whose
#: effect on the interpreter (environment, working directory, display precision) the
#: interpreter-state probes carry.
_QUIET_MAGICS = frozenset(
    {
        "env",
        "set_env",
        "precision",
        "config",
        "matplotlib",
        "pip",
        "conda",
        "mamba",
        "writefile",
        "cd",
        "pwd",
        "ls",
        "who",
        "whos",
        "who_ls",
        "history",
        "html",
        "HTML",
        "javascript",
        "js",
        "markdown",
        "latex",
        "svg",
        "bash",
        "sh",
        "script",
        "system",
        "sx",
        "lsmagic",
        "magic",
        "page",
        "pinfo",
        "pinfo2",
        "psearch",
        "doctest_mode",
    }
)

#: Magics whose argument is Python code run in the user namespace: the code is analysed too.
#: Value: the index of the argument holding the code (line magics: 1; cell magics: 2).
_CODE_MAGICS = frozenset({"time", "timeit", "prun", "capture"})


@dataclass(frozen=True, slots=True)
class CellEffects:
    """What a cell may have touched."""

    #: Global names the cell mentions; None when it may have touched any global.
    names: frozenset[str] | None
    #: ``root.a.b = ...`` and ``setattr(root, "a", ...)``: (root name, attribute path).
    attribute_stores: tuple[tuple[str, tuple[str, ...]], ...] = ()


_ANYTHING = CellEffects(None)


def _attribute_path(node: ast.expr) -> tuple[str, tuple[str, ...]] | None:
    path: list[str] = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and path:
        return node.id, tuple(reversed(path))
    return None


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        found: list[ast.expr] = []
        for target in node.targets:
            found.extend(_flatten(target))
        return found
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    if isinstance(node, ast.Delete):
        return list(node.targets)
    return []


def _flatten(target: ast.expr) -> list[ast.expr]:
    if isinstance(target, ast.Tuple | ast.List):
        return [t for element in target.elts for t in _flatten(element)]
    if isinstance(target, ast.Starred):
        return _flatten(target.value)
    return [target]


def _magic_call(node: ast.Call) -> tuple[str, list[ast.expr]] | None:
    """``get_ipython().METHOD(args)`` -> (METHOD, args)."""
    func = node.func
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
    ):
        return func.attr, list(node.args)
    return None


def _constant(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _analyse(source: str, depth: int = 0) -> CellEffects:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _ANYTHING
    names: set[str] = set()
    stores: list[tuple[str, tuple[str, ...]]] = []
    magic_calls: set[int] = set()  # id of the get_ipython() calls that are vetted magics
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            magic = _magic_call(node)
            if magic is not None:
                method, args = magic
                inner = _vetted_magic(method, args, depth)
                if inner is None:
                    return _ANYTHING
                names |= inner.names or set()
                stores.extend(inner.attribute_stores)
                assert isinstance(node.func, ast.Attribute)
                magic_calls.add(id(node.func.value))
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
                root = node.args[0]
                attr = _constant(node.args[1]) if len(node.args) > 1 else None
                if isinstance(root, ast.Name) and attr is not None:
                    stores.append((root.id, (attr,)))
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return _ANYTHING  # binds names it does not list
                names.add((alias.asname or alias.name).split(".")[0])
        for target in _targets(node):
            path = _attribute_path(target)
            if path is not None:
                stores.append(path)
    if names & _DYNAMIC_NAMES:
        return _ANYTHING
    # get_ipython() itself appears in every magic: only unvetted uses make the cell opaque.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "get_ipython"
            and id(node) not in magic_calls
        ):
            return _ANYTHING
    names.discard("get_ipython")
    return CellEffects(frozenset(names), tuple(dict.fromkeys(stores)))


def _vetted_magic(method: str, args: list[ast.expr], depth: int) -> CellEffects | None:
    """The effects of one ``get_ipython().METHOD(...)`` call, None if it may touch anything."""
    if method in ("system", "getoutput"):  # ``!cmd``: a shell command
        return CellEffects(frozenset())
    if method not in ("run_line_magic", "run_cell_magic") or not args:
        return None
    name = _constant(args[0])
    if name is None:
        return None
    if name in _QUIET_MAGICS:
        return CellEffects(frozenset())
    if name in _CODE_MAGICS and depth < 3:
        pieces = [_constant(a) for a in args[1:]]
        if any(p is None for p in pieces):
            return None
        names: set[str] = set()
        stores: list[tuple[str, tuple[str, ...]]] = []
        for piece in pieces:
            assert piece is not None
            # ``%time x = 1`` carries code; ``%%capture out`` carries a target name.
            code = piece if name != "capture" or piece is pieces[-1] else ""
            inner = _analyse(code, depth + 1) if code.strip() else CellEffects(frozenset())
            if inner.names is None:
                return None
            names |= inner.names
            stores.extend(inner.attribute_stores)
            if name == "capture" and piece is pieces[0]:
                names.update(piece.split())
        return CellEffects(frozenset(names), tuple(stores))
    return None


def analyse_cell(source: str) -> CellEffects:
    """The names and module attributes a cell may have touched (see the module docstring).
    An empty or unparsable source touches anything (the caller then looks at every name)."""
    if not source.strip():
        return _ANYTHING
    return _analyse(source)


#: Nodes whose names are local to them (functions, classes, comprehensions).
_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.GeneratorExp,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
)


def bound_names(source: str) -> list[str]:
    """The globals a cell binds or deletes (assignments, ``def``/``class``, imports, names
    declared ``global`` in its functions), sorted; for telling the user which names a cell
    whose state was lost had set. Empty for a cell that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Global):
                names.update(child.names)
            if top:
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store | ast.Del):
                    names.add(child.id)
                elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(child.name)
                elif isinstance(child, ast.Import | ast.ImportFrom):
                    names.update(
                        (a.asname or a.name).split(".")[0] for a in child.names if a.name != "*"
                    )
            visit(child, top and not isinstance(child, _SCOPES))

    visit(tree, True)
    return sorted(names)
