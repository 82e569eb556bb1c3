"""Which objects a notebook value reaches: the identity side of state synchronisation.

Two names that reach one mutable object (``b = a``, a view and its array, an optimizer and
the model's parameters, a bound method and its instance, two closures sharing a cell) must
travel in one pickle, so that the object is still shared on the other replicas. Called by
:class:`~._sync.StateSynchronizer` for the names a cell may have changed.

The walk follows what a pickle of the value would contain, and stops where identity is kept
by other means or does not matter:

* immutable atoms (numbers, strings, bytes, None): sharing them changes nothing;
* modules, classes and code: pickled by reference, or by value with cloudpickle's class
  tracking, which keeps one class per replica across pickles;
* module dictionaries and the user namespace (the globals of notebook functions: those travel
  under their own names).

While walking it also collects the global names that reached code may read or write (the
functions reached and the methods of notebook classes of the instances reached), so that the
caller can widen the set of names a cell may have touched.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import inspect
import operator
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ATOMIC_TYPES",
    "Reach",
    "code_names",
    "connected_components",
    "numpy_view_root",
    "reach",
    "shared_arrays",
]

#: Values whose identity does not matter: shared or not, they behave the same.
ATOMIC_TYPES: frozenset[type] = frozenset(
    {
        int,
        float,
        complex,
        bool,
        str,
        bytes,
        range,
        type(None),
        type(Ellipsis),
        type(NotImplemented),
    }
)

#: Never walked into: pickled by reference or by name, so their identity survives anyway
#: (modules, classes, enum members), or immutable (code).
_OPAQUE_TYPES: tuple[type, ...] = (
    types.ModuleType,
    type,
    types.CodeType,
    types.FrameType,
    enum.Enum,
)

#: Stop walking after this many objects: the value is then treated as sharing with everything
#: (its component is the whole namespace), which is correct, only slower.
WALK_LIMIT = 2_000_000


@dataclass(slots=True)
class Reach:
    """What one walk found."""

    #: ids of the non-atomic objects reached (the root included).
    ids: set[int] = field(default_factory=set)
    #: global names read or written by code reached (functions, methods of notebook classes).
    names: set[str] = field(default_factory=set)
    #: the walk hit ``WALK_LIMIT``.
    truncated: bool = False
    #: the value holds the user namespace itself (``g = globals()``): it cannot be copied.
    holds_namespace: bool = False


_code_names_cache: dict[int, tuple[types.CodeType, frozenset[str]]] = {}


def code_names(code: types.CodeType) -> frozenset[str]:
    """Every name a code object and the code nested in it may load or store as a global or
    attribute (``co_names``: a superset of the globals it touches)."""
    cached = _code_names_cache.get(id(code))
    if cached is not None and cached[0] is code:
        return cached[1]
    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    result = frozenset(names)
    if len(_code_names_cache) > 4096:
        _code_names_cache.clear()
    _code_names_cache[id(code)] = (code, result)
    return result


def _class_names(cls: type) -> set[str]:
    """Names used by the methods of a notebook class and of its notebook bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if getattr(klass, "__module__", None) != "__main__":
            continue
        for member in list(vars(klass).values()):
            func = getattr(member, "__func__", member)  # staticmethod, classmethod
            func = getattr(func, "fget", func)  # property
            code = getattr(func, "__code__", None)
            if isinstance(code, types.CodeType):
                names |= code_names(code)
    return names


#: The loaded modules and their namespaces when ``_module_dict_ids`` last ran, and its result.
#: Held, not only their ids: a module dropped from ``sys.modules`` and freed could otherwise
#: have its id (or its namespace's) reused by a new module or by a notebook object, and the
#: stale answer made the walk skip that object (seen: two closures sharing a cell became two
#: cells after a failover).
_module_dicts: tuple[list[Any], list[Any], frozenset[int]] = ([], [], frozenset())
#: (the module ids it was built from, a namespace's id, both together): ``_skip_ids``.
_skip: tuple[frozenset[int], int, frozenset[int]] = (frozenset(), 0, frozenset())


def _module_dict_ids() -> frozenset[int]:
    """The ids of every loaded module's namespace (the walk does not enter them). Asked after
    every cell: the answer is kept while ``sys.modules`` holds the same module objects (the
    cache holds them and their namespaces, so no id in it can be reused meanwhile), which
    costs one identity pass in C (``map(operator.is_, ...)``) instead of ~1,000 ``getattr``s."""
    global _module_dicts
    modules = list(sys.modules.values())
    cached = _module_dicts[0]
    if len(modules) != len(cached) or not all(map(operator.is_, modules, cached)):
        namespaces = []
        for module in modules:
            namespace = getattr(module, "__dict__", None)
            if namespace is not None:
                namespaces.append(namespace)
        _module_dicts = (modules, namespaces, frozenset(map(id, namespaces)))
    return _module_dicts[2]


def _skip_ids(namespace_id: int) -> frozenset[int]:
    """What a walk from ``namespace_id``'s namespace does not enter: the modules' namespaces
    and that one. Kept between walks (every capture and every applied state walks)."""
    global _skip
    module_ids = _module_dict_ids()
    if _skip[0] is not module_ids or _skip[1] != namespace_id:
        _skip = (module_ids, namespace_id, module_ids | {namespace_id})
    return _skip[2]


class _StorageToken:
    """Stands for one torch storage in the walk (see ``_storage_token``)."""


#: (address, device, size) of a torch storage -> its token. Tokens live as long as the process
#: (ids in the identity index must not be reused); the table is cleared when it grows large,
#: which at worst makes two slots look shared once more (correct, only slower).
_STORAGE_TOKENS: dict[tuple[Any, ...], _StorageToken] = {}


def _storage_token(storage: Any) -> _StorageToken:
    key = (storage.data_ptr(), str(storage.device), storage.nbytes())
    token = _STORAGE_TOKENS.get(key)
    if token is None:
        if len(_STORAGE_TOKENS) > 100_000:
            _STORAGE_TOKENS.clear()
        token = _STORAGE_TOKENS[key] = _StorageToken()
    return token


class _Walker:
    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace_id = id(namespace)
        self.skip_ids = _skip_ids(self.namespace_id)
        self.numpy = sys.modules.get("numpy")
        self.torch = sys.modules.get("torch")
        self.seen_classes: set[int] = set()
        self.opaque = _OPAQUE_TYPES
        if self.numpy is not None:  # dtypes are singletons shared by every array
            self.opaque = (*_OPAQUE_TYPES, self.numpy.dtype)

    def note_class(self, cls: type, found: Reach) -> None:
        """A notebook class reached: the names its methods use may be touched."""
        if id(cls) not in self.seen_classes and getattr(cls, "__module__", None) == "__main__":
            self.seen_classes.add(id(cls))
            found.names |= _class_names(cls)

    def children(self, obj: Any, found: Reach) -> Iterable[Any]:
        kind = type(obj)
        if kind is types.FunctionType:
            found.names |= code_names(obj.__code__)
            parts: list[Any] = [obj.__defaults__, obj.__kwdefaults__, obj.__dict__]
            if obj.__closure__:
                parts.extend(obj.__closure__)
            return parts
        if kind is types.MethodType:
            return (obj.__self__, obj.__func__)
        if kind is types.BuiltinMethodType:
            owner = obj.__self__
            return () if isinstance(owner, types.ModuleType) else (owner,)
        if kind is types.GeneratorType:
            # What its pickle holds: the arguments of a generator not started (``_pickling``);
            # nothing of one in progress (it cannot be copied).
            if inspect.getgeneratorstate(obj) != inspect.GEN_CREATED:
                return ()
            return list(obj.gi_frame.f_locals.values())
        if kind in (types.CoroutineType, types.AsyncGeneratorType):
            return ()
        if kind is weakref.ReferenceType:
            referent = obj()  # its pickle rebuilds it from the referent: share it
            return () if referent is None else (referent,)
        if kind is types.CellType:
            try:
                return (obj.cell_contents,)
            except ValueError:
                return ()
        if self.numpy is not None and isinstance(obj, self.numpy.ndarray):
            base = obj.base
            return (base,) if base is not None else ()
        if self.torch is not None and isinstance(obj, self.torch.Tensor):
            # Tensors sharing memory (views) share nothing a Python walk can see: a token per
            # storage stands for it.
            referents = gc.get_referents(obj)
            with contextlib.suppress(RuntimeError, NotImplementedError):  # sparse, meta ...
                referents.append(_storage_token(obj.untyped_storage()))
            return referents
        self.note_class(kind, found)
        referents = gc.get_referents(obj)
        if len(referents) > 64 and set(map(type, referents)) <= ATOMIC_TYPES:
            return ()  # a big container of numbers or strings: nothing to share
        return referents

    def walk(self, root: Any, found: Reach) -> None:
        if type(root) in ATOMIC_TYPES:
            return
        if isinstance(root, self.opaque):
            if isinstance(root, type):
                self.note_class(root, found)
            return
        stack = [root]
        ids = found.ids
        skip = self.skip_ids
        opaque = self.opaque
        while stack:
            obj = stack.pop()
            ident = id(obj)
            if ident in ids or ident in skip:
                if ident == self.namespace_id:
                    found.holds_namespace = True
                continue
            ids.add(ident)
            if len(ids) > WALK_LIMIT:
                found.truncated = True
                return
            for child in self.children(obj, found):
                if type(child) in ATOMIC_TYPES or isinstance(child, opaque):
                    if isinstance(child, type):
                        self.note_class(child, found)
                    continue
                stack.append(child)


#: Libraries whose objects copy on write (pandas): the arrays inside them are logically
#: independent even where they share memory, so they must not become views of each other.
_COPY_ON_WRITE = ("pandas.",)


def numpy_view_root(obj: Any) -> Any | None:
    """The array that owns a NumPy view's memory, or None if ``obj`` is not such a view."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(obj) is not numpy.ndarray:
        return None
    base = obj.base
    if not isinstance(base, numpy.ndarray):
        return None
    root = base
    while isinstance(root.base, numpy.ndarray):
        root = root.base
    return root


def shared_arrays(values: Iterable[Any], namespace: dict[str, Any]) -> set[int]:
    """ids of the NumPy arrays reachable from ``values`` other than through copy-on-write
    containers: those whose sharing of memory with another array is the user's (``v =
    a[2:5]``), for ``_pickling`` to keep as views."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return set()
    walker = _Walker(namespace)
    arrays: set[int] = set()
    seen: set[int] = set()
    stack = [v for v in values if type(v) not in ATOMIC_TYPES]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in walker.skip_ids or isinstance(obj, walker.opaque):
            continue
        seen.add(id(obj))
        if len(seen) > WALK_LIMIT:
            break
        if isinstance(obj, numpy.ndarray):
            arrays.add(id(obj))
        if (type(obj).__module__ or "").startswith(_COPY_ON_WRITE):
            continue
        stack.extend(c for c in walker.children(obj, Reach()) if type(c) not in ATOMIC_TYPES)
    return arrays


def reach(values: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Reach]:
    """Walk each value on its own: slot -> what it reaches."""
    walker = _Walker(namespace)
    result: dict[str, Reach] = {}
    for slot, value in values.items():
        found = Reach()
        walker.walk(value, found)
        result[slot] = found
    return result


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[str]]:
        grouped: dict[str, list[str]] = {}
        for item in self.parent:
            grouped.setdefault(self.find(item), []).append(item)
        return [sorted(g) for g in sorted(grouped.values(), key=min)]


def connected_components(reached: Mapping[str, frozenset[int]]) -> list[list[str]]:
    """Group slots that reach a common object (sorted slots, groups by their first slot)."""
    groups = _UnionFind(reached)
    first: dict[int, str] = {}
    for slot in sorted(reached):
        for ident in reached[slot]:
            other = first.setdefault(ident, slot)
            if other != slot:
                groups.union(other, slot)
    return groups.groups()
