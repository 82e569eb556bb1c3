"""What a cell reads before it binds it, and whether running it again could be seen outside the
namespace. Pure analysis of the cell's source (and of the notebook code it calls); used by
``_recompute`` on the executor to decide whether a cell may be run again on another replica.

``free_reads`` follows the order of the cell's statements: ``z = x @ w; print(z)`` reads ``x``
and ``w`` but not ``z``. Branches and loops are conservative: a name bound inside an ``if`` or
a loop body counts as bound only inside it. Functions, lambdas and comprehensions read the
globals they name and do not bind (their parameters and locals are theirs).

``side_effect`` answers with the first thing in the cell (or in the notebook functions and
classes it uses) that could act outside the namespace: files, processes, the network, the
clock, displays, IPython magics and shell escapes. It is a denylist, so it can only make a
cell *less* eligible; the replica that runs a cell again also checks that the values it
rebuilt equal the ones the executor shipped (``_recompute``).
"""

from __future__ import annotations

import ast
import types
from collections.abc import Iterable, Mapping

__all__ = ["free_reads", "side_effect"]

_Scope = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
_Comprehension = ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp

#: Modules (and their submodules) whose use is an effect outside the namespace or reads the
#: outside world (the clock, the file system, the network).
_EFFECT_MODULES = (
    "os",
    "sys",
    "subprocess",
    "shutil",
    "socket",
    "ssl",
    "select",
    "pathlib",
    "io",
    "tempfile",
    "glob",
    "fnmatch",
    "time",
    "datetime",
    "uuid",
    "secrets",
    "threading",
    "multiprocessing",
    "concurrent",
    "asyncio",
    "signal",
    "requests",
    "httpx",
    "urllib",
    "urllib3",
    "http",
    "ftplib",
    "smtplib",
    "sqlite3",
    "pickle",
    "shelve",
    "logging",
    "webbrowser",
    "IPython",
    "ipykernel",
    "ipywidgets",
    "matplotlib.pyplot",
    "nbcluster",
)

#: Builtins that act outside the namespace.
_EFFECT_BUILTINS = frozenset(
    {
        "open",
        "input",
        "breakpoint",
        "display",
        "exec",
        "eval",
        "compile",
        "__import__",
        "exit",
        "quit",
        "help",
        "get_ipython",
        "globals",
        "vars",
        "locals",
        "setattr",
        "delattr",
    }
)

#: Methods that write, send or show, whatever object has them.
_EFFECT_METHODS = frozenset(
    {
        "write",
        "writelines",
        "write_text",
        "write_bytes",
        "save",
        "savez",
        "savez_compressed",
        "savefig",
        "savetxt",
        "tofile",
        "to_csv",
        "to_parquet",
        "to_pickle",
        "to_json",
        "to_excel",
        "to_sql",
        "to_hdf",
        "to_feather",
        "to_clipboard",
        "dump",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "makedirs",
        "rename",
        "touch",
        "chmod",
        "send",
        "sendall",
        "post",
        "put",
        "patch",
        "request",
        "urlopen",
        "system",
        "popen",
        "download",
        "upload",
        "show",
        "display",
        "flush",
        "commit",
        "execute",
        "executemany",
        "kill",
        "terminate",
        "start",
        "sleep",
    }
)

#: How deep the check follows notebook functions into the notebook functions they use.
_DEPTH = 4


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    args = node.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    if args.vararg:
        every.append(args.vararg)
    if args.kwarg:
        every.append(args.kwarg)
    return {a.arg for a in every}


def _scope_reads(node: ast.AST) -> set[str]:
    """The globals a function, lambda, class body or comprehension reads (free names)."""
    local: set[str] = set()
    declared: set[str] = set()
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        local |= _params(node)
        body: list[ast.AST] = [node.body] if isinstance(node, ast.Lambda) else list(node.body)
    elif isinstance(node, ast.ClassDef):
        body = list(node.body)
    else:
        assert isinstance(node, _Comprehension)
        parts: list[ast.AST] = []
        for index, generator in enumerate(node.generators):
            local |= _store_names(generator.target)
            if index:
                parts.append(generator.iter)  # the first iterable is read outside
            parts.extend(generator.ifs)
        if isinstance(node, ast.DictComp):
            parts.extend([node.key, node.value])
        else:
            parts.append(node.elt)
        body = parts
    loads: set[str] = set()
    for part in body:
        for child in _direct_nodes(part):
            if isinstance(child, ast.Name):
                if isinstance(child.ctx, ast.Load):
                    loads.add(child.id)
                else:
                    local.add(child.id)
            elif isinstance(child, ast.Global | ast.Nonlocal):
                declared.update(child.names)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                local.add(child.name)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                local.update((a.asname or a.name).split(".")[0] for a in child.names)
        for nested in _nested_scopes(part):
            loads |= _scope_reads(nested) | _enclosing_reads(nested)
    return loads - (local - declared) if not isinstance(node, ast.ClassDef) else loads


def _store_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _direct_nodes(node: ast.AST) -> Iterable[ast.AST]:
    """The nodes of ``node`` that belong to its scope: not inside a nested function, lambda,
    class or comprehension (whose parts evaluated outside are in ``_enclosing_reads``)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for child in ast.iter_child_nodes(current):
            if not isinstance(child, _Scope | _Comprehension):
                stack.append(child)


def _nested_scopes(node: ast.AST) -> Iterable[ast.AST]:
    """The scopes directly nested in ``node`` (not those nested in them), ``node`` itself if
    it is one."""
    if isinstance(node, _Scope | _Comprehension):
        yield node
        return
    for child in _direct_nodes(node):
        for grandchild in ast.iter_child_nodes(child):
            if isinstance(grandchild, _Scope | _Comprehension):
                yield grandchild


def _enclosing_reads(scope: ast.AST) -> set[str]:
    """What a nested scope's definition reads where it is defined: decorators, defaults,
    annotations, base classes, a comprehension's first iterable."""
    parts: list[ast.AST] = []
    if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        parts.extend(scope.args.defaults)
        parts.extend(d for d in scope.args.kw_defaults if d is not None)
        if not isinstance(scope, ast.Lambda):
            parts.extend(scope.decorator_list)
    elif isinstance(scope, ast.ClassDef):
        parts.extend([*scope.decorator_list, *scope.bases, *(k.value for k in scope.keywords)])
    elif isinstance(scope, _Comprehension):
        parts.append(scope.generators[0].iter)
    return set().union(*(_reads(p) for p in parts)) if parts else set()


def _reads(node: ast.AST) -> set[str]:
    """The globals an expression or simple statement reads (nested scopes included)."""
    loads = {
        n.id for n in _direct_nodes(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    for nested in _nested_scopes(node):
        loads |= _scope_reads(nested) | _enclosing_reads(nested)
    return loads


def _binds(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, ast.Assign):
        return set().union(*(_store_names(t) for t in stmt.targets))
    if isinstance(stmt, ast.AnnAssign | ast.AugAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    return set()


class _Reader:
    def __init__(self) -> None:
        self.reads: set[str] = set()

    def block(self, statements: list[ast.stmt], bound: set[str]) -> None:
        """Statements run in order; ``bound`` (mutated) the names surely bound so far."""
        for stmt in statements:
            self.statement(stmt, bound)

    def statement(self, stmt: ast.stmt, bound: set[str]) -> None:
        if isinstance(stmt, ast.With | ast.AsyncWith):
            for item in stmt.items:
                self.reads |= _reads(item.context_expr) - bound
                if item.optional_vars is not None:
                    bound |= _store_names(item.optional_vars)
            self.block(stmt.body, bound)
        elif isinstance(stmt, ast.For | ast.AsyncFor):
            self.reads |= _reads(stmt.iter) - bound
            self.block(stmt.body, bound | _store_names(stmt.target))
            self.block(stmt.orelse, set(bound))
        elif isinstance(stmt, ast.If | ast.While):
            self.reads |= _reads(stmt.test) - bound
            self.block(stmt.body, set(bound))
            self.block(stmt.orelse, set(bound))
        elif isinstance(stmt, ast.Try | ast.TryStar):
            self.block(stmt.body, set(bound))
            for handler in stmt.handlers:
                if handler.type is not None:
                    self.reads |= _reads(handler.type) - bound
                inner = set(bound) | ({handler.name} if handler.name else set())
                self.block(handler.body, inner)
            self.block(stmt.orelse, set(bound))
            self.block(stmt.finalbody, set(bound))
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self.reads |= (_scope_reads(stmt) | _enclosing_reads(stmt)) - bound
            bound |= _binds(stmt)
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign | ast.Expr):
            reads = _reads(stmt)
            if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
                reads.add(stmt.target.id)  # ``x += 1`` reads x
            self.reads |= reads - bound
            bound |= _binds(stmt)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            bound |= _binds(stmt)
        else:  # match, return, del, global ...: everything it names is read
            self.reads |= {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)} - bound


def free_reads(source: str) -> frozenset[str] | None:
    """The globals a cell may read before binding them, or None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    reader = _Reader()
    reader.block(tree.body, set())
    return frozenset(reader.reads)


def _module_name(value: object) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    return str(getattr(value, "__module__", "") or "")


def _effect_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _EFFECT_MODULES)


def _is_notebook_code(value: object) -> bool:
    return _module_name(value) == "__main__"


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _notebook_functions(value: object) -> list[types.FunctionType]:
    """The notebook functions a value runs: itself, a class's methods, an instance's class's
    methods (the notebook classes of its type's MRO)."""
    if isinstance(value, types.FunctionType):
        return [value] if _is_notebook_code(value) else []
    if isinstance(value, types.MethodType):
        return _notebook_functions(value.__func__)
    classes = value.__mro__ if isinstance(value, type) else type(value).__mro__
    found: list[types.FunctionType] = []
    for cls in classes:
        if not _is_notebook_code(cls):
            continue
        for member in vars(cls).values():
            function = getattr(member, "__func__", member)
            if isinstance(function, types.FunctionType):
                found.append(function)
            elif isinstance(member, property):
                found.extend(
                    f
                    for f in (member.fget, member.fset, member.fdel)
                    if isinstance(f, types.FunctionType)
                )
    return found


def _value_effect(name: str, value: object) -> str | None:
    if _effect_module(_module_name(value)):
        return f"{name} ({_module_name(value)})"
    return None


def side_effect(source: str, namespace: Mapping[str, object]) -> str | None:
    """The first thing in the cell, or in the notebook functions and classes it uses, that
    could act outside the namespace or read the outside world ("open", "os", "plt.show" ...),
    or None when nothing was found."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return "a cell that does not parse"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in _EFFECT_METHODS:
            return f".{node.attr}()"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                full = f"{module}.{alias.name}" if module else alias.name
                if _effect_module(full) or (module and _effect_module(module)):
                    return f"import {full}"
    return _names_effect(names, namespace, set(), 0)


def _names_effect(
    names: Iterable[str], namespace: Mapping[str, object], seen: set[int], depth: int
) -> str | None:
    import builtins

    for name in sorted(names):
        if name in _EFFECT_BUILTINS and (name not in namespace or depth == 0):
            return f"{name}()"
        if name in _EFFECT_METHODS and depth > 0:
            return f".{name}()"  # an attribute name in a function's code
        value = namespace.get(name, getattr(builtins, name, None))
        if value is None:
            continue
        found = _value_effect(name, value)
        if found is not None:
            return found
        if depth >= _DEPTH:
            if _notebook_functions(value):
                return f"{name} (notebook code nested too deep to check)"
            continue
        for function in _notebook_functions(value):
            if id(function) in seen:
                continue
            seen.add(id(function))
            found = _names_effect(
                _code_names(function.__code__), function.__globals__, seen, depth + 1
            )
            if found is not None:
                return f"{found} in {function.__qualname__}"
    return None
