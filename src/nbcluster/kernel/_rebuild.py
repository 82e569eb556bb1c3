"""The functions that rebuild, on the replica that loads a pickle, what ``_pickling``'s
reducers took apart: notebook functions bound to the loader's namespace, closures sharing their
cells, classes built once (with their slots and qualified names, without running
``__init_subclass__`` again), decorated callables, modules, tensors, views, files, locks.

Nothing calls these directly: pickles written by :mod:`~._pickling` name them, and
``_pickling.loads`` runs them (with ``TARGET_NAMESPACE`` set to the namespace being loaded into).
They stay at these names: a pickle refers to each by module and name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import marshal
import pickle
import re
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle.cloudpickle as cloudpickle_impl  # type: ignore[import-untyped]

from ._host_copies import HostHolder, note_host_copy

#: The namespace that notebook functions unpickled by ``loads`` are bound to.
TARGET_NAMESPACE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "nbcluster_sync_target_namespace", default=None
)


# -- rebuilders (run on the replica that loads) ---------------------------------------------


def _load_code(data: bytes) -> types.CodeType:
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):
        raise pickle.UnpicklingError("a code entry did not hold a code object")
    return code


def _make_namespace_function(code: types.CodeType, closure: tuple[Any, ...] | None) -> Any:
    """A notebook function, bound to the namespace being loaded into."""
    import builtins

    namespace = TARGET_NAMESPACE.get()
    if namespace is None:  # loaded outside a synchroniser: a namespace of its own
        namespace = {"__builtins__": builtins}
    return types.FunctionType(code, namespace, None, None, closure)


def _set_namespace_function_state(func: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """cloudpickle's ``_function_setstate`` minus its ``__builtins__`` write into the (shared)
    globals, and minus its copy of the closure's values: the function was built with the
    original cells themselves (shared with the other closures of the same scope)."""
    attributes, slots = state
    func.__dict__.update(attributes)
    slots = dict(slots)
    carried = slots.pop("__globals__", {})
    slots.pop("__closure__", None)
    slots.pop("_cloudpickle_submodules", None)  # only kept the submodules imported
    func.__globals__.update(carried)
    for name, value in slots.items():
        setattr(func, name, value)


@contextlib.contextmanager
def _quiet_init_subclass(bases: tuple[type, ...]) -> Iterator[None]:
    """Notebook classes' ``__init_subclass__`` hooks do nothing meanwhile: rebuilding a
    subclass must not run them again (a registry would list it twice); what they did on the
    executor arrives with the objects they changed."""
    saved: list[tuple[type, Any]] = []
    for base in {klass for b in bases for klass in getattr(b, "__mro__", ())}:
        hook = base.__dict__.get("__init_subclass__")
        if hook is not None and base.__module__ == "__main__":
            saved.append((base, hook))
            setattr(base, "__init_subclass__", classmethod(_ignore_subclass))  # noqa: B010
    try:
        yield
    finally:
        for base, hook in saved:
            setattr(base, "__init_subclass__", hook)  # noqa: B010  # a dunder on a class


def _ignore_subclass(cls: type, /, **kwargs: Any) -> None:
    return None


def _make_class_once(
    type_constructor: Any,
    name: str,
    bases: tuple[type, ...],
    type_kwargs: dict[str, Any],
    class_tracker_id: Any,
    extra: Any,
) -> Any:
    """cloudpickle's ``_make_skeleton_class``, except that a class this replica already has
    is returned without building a skeleton first (building one runs the bases'
    ``__init_subclass__`` and the metaclass again), and that hooks stay quiet while one is
    built."""
    if class_tracker_id is not None:
        with cloudpickle_impl._DYNAMIC_CLASS_TRACKER_LOCK:
            known = cloudpickle_impl._DYNAMIC_CLASS_TRACKER_BY_ID.get(class_tracker_id)
        if known is not None:
            return known
    kwargs = {sys.intern(k): v for k, v in type_kwargs.items()}
    with _quiet_init_subclass(bases):
        skeleton = types.new_class(
            name, bases, {"metaclass": type_constructor}, lambda ns: ns.update(kwargs)
        )
    return cloudpickle_impl._lookup_class_or_track(class_tracker_id, skeleton)


def _empty_cell() -> Any:
    return types.CellType()


def _fill_cell(cell: Any, value: Any) -> None:
    if value is not _EMPTY:
        cell.cell_contents = value


class _Empty:
    """Marks a cell with no value (pickled by reference: one object everywhere)."""


_EMPTY = _Empty()


def _new_type(name: str, supertype: Any, module: str) -> Any:
    make: Any = typing.NewType  # called with a name known only at run time
    new_type = make(name, supertype)
    new_type.__module__ = module  # NewType takes its caller's module: this one
    return new_type


def _rebuild_lru_cache(wrapped: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(wrapped)


def _rebuild_cached_property(func: Callable[..., Any], name: str | None, doc: str | None) -> Any:
    prop = functools.cached_property(func)
    prop.attrname = name
    prop.__doc__ = doc
    return prop


def _rebuild_singledispatch(
    default: Callable[..., Any],
    registry: list[tuple[type, Callable[..., Any]]],
    extra: dict[str, Any],
) -> Any:
    dispatcher = functools.singledispatch(default)
    for cls, implementation in registry:
        dispatcher.register(cls, implementation)
    for key, value in extra.items():
        setattr(dispatcher, key, value)
    return dispatcher


def _import_module(name: str, submodules: list[str]) -> types.ModuleType:
    module = importlib.import_module(name)
    for sub in submodules:
        if sub not in sys.modules:
            try:
                importlib.import_module(sub)
            except ImportError:  # not installed here: the module itself still arrives
                continue
    return module


def _is_dynamic(module: types.ModuleType) -> bool:
    """Made at run time, not imported from anywhere."""
    return (
        getattr(module, "__spec__", None) is None
        and getattr(module, "__file__", None) is None
        and module.__name__ not in sys.builtin_module_names
    )


def _new_module(name: str, registered: bool) -> types.ModuleType:
    existing = sys.modules.get(name)
    if registered and isinstance(existing, types.ModuleType) and _is_dynamic(existing):
        return existing  # the same module object for every name that holds it
    module = types.ModuleType(name)
    if registered:
        sys.modules[name] = module
    return module


def _fill_module(module: types.ModuleType, state: dict[str, Any]) -> None:
    import builtins

    module.__dict__.update(state)
    module.__dict__["__builtins__"] = builtins.__dict__


def _no_traceback() -> None:
    return None


def _new_lock(reentrant: bool) -> Any:
    return threading.RLock() if reentrant else threading.Lock()


def _rematch(pattern: re.Pattern[Any], string: Any, start: int, endpos: int) -> Any:
    # The engine is deterministic at a given start: matching there again gives the same match
    # (lookbehinds still see the text before ``start``).
    return pattern.match(string, start, endpos)


def _restart_generator(
    code: types.CodeType,
    positional: tuple[Any, ...],
    keywords: dict[str, Any],
    closure: tuple[Any, ...] | None,
) -> Any:
    """A generator that had not started: call its code again with the same arguments."""
    namespace = TARGET_NAMESPACE.get()
    if namespace is None:
        import builtins

        namespace = {"__builtins__": builtins}
    cells = tuple(types.CellType(v) for v in closure) if closure is not None else None
    return types.FunctionType(code, namespace, None, None, cells)(*positional, **keywords)


def _new_context_var(name: str, default: Any, has_default: bool) -> Any:
    if has_default:
        return contextvars.ContextVar(name, default=default)
    return contextvars.ContextVar(name)


def _rebuild_tensor(
    holder: Any,
    dtype: Any,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    grad: Any,
    parameter: bool,
) -> Any:
    import torch

    origin = None
    if isinstance(holder, HostHolder):  # GPU memory of the executor, in host memory here
        origin, holder = holder.origin, holder.tensor
    tensor = torch.empty(0, dtype=dtype, device=holder.device)
    tensor.set_(holder.untyped_storage(), offset, size, stride)
    if parameter:
        tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    elif requires_grad:
        tensor.requires_grad_(True)
    if grad is not None:
        tensor.grad = grad
    if origin is not None:
        note_host_copy(tensor, origin)
    return tensor


def _load_npz(path: str, allow_pickle: bool) -> Any:
    import numpy

    return numpy.load(path, allow_pickle=allow_pickle)


def _rebuild_from_state(cls: Any, state: Any) -> Any:
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _reopen(path: str, mode: str, encoding: str | None, position: int) -> Any:
    file = open(path, mode, encoding=encoding)  # noqa: SIM115  # the value is the open file
    file.seek(position)
    return file


def _rebuild_view(root: Any, shape: tuple[int, ...], dtype: Any, offset: int, strides: Any) -> Any:
    import numpy

    return numpy.ndarray(shape, dtype, buffer=root, offset=offset, strides=strides)
