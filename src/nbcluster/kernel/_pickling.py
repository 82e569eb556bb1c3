"""How notebook values are pickled between a kernel's replicas: cloudpickle, plus reducers for
the Python that notebooks actually hold.

Called by :class:`~._sync.StateSynchronizer` (``dumps`` on the executor, ``loads`` on the
others). One pickle holds a whole *component* (several names that share objects), so pickle's
memo keeps their identities; the reducers here make values arrive that plain cloudpickle
loses or refuses:

* code objects keep their ``co_filename`` (cloudpickle >= 3.1.3 writes ``<dynamic-code>``), so
  tracebacks and ``inspect.getsource`` work after a failover;
* ``functools.lru_cache``/``cache`` wrappers, ``cached_property``, ``singledispatch``
  functions and ``typing.NewType`` defined in the notebook are rebuilt from their parts
  (caches start empty on the new executor);
* modules import the submodules the executor had (``import xml.dom.minidom`` binds ``xml``);
* NumPy views stay views of their base array when both travel in one pickle (not inside
  pandas objects, which copy on write); torch tensors sharing a storage share it again, and
  parameters keep their ``.grad``;
* a traceback is replaced by ``None`` and reported (``Pickled.lossy``); files open for reading are reopened at the same position (others are refused: cloudpickle
  would read and ship their contents); locks that are not held arrive as new locks;
  ``re.Match`` objects are matched again; weak references keep pointing at their referent
  (``_graph`` puts the referent in the same pickle); a generator that has not started is
  rebuilt by calling its code again with the same arguments (ElasticNotebook's recomputation,
  where it is exact); a ``ContextVar`` arrives with the executor's value as its default.

Deep structures (a linked list 5,000 long) are retried on a thread with a large stack. The
functions that rebuild all this where it is loaded are in ``_rebuild``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import io
import itertools
import marshal
import os
import pickle
import re
import sys
import threading
import types
import typing
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle  # type: ignore[import-untyped]
import cloudpickle.cloudpickle as cloudpickle_impl  # type: ignore[import-untyped]

from . import _host_copies
from ._graph import numpy_view_root
from ._rebuild import (
    _EMPTY,
    TARGET_NAMESPACE,
    _empty_cell,
    _fill_cell,
    _fill_module,
    _import_module,
    _is_dynamic,
    _load_code,
    _load_npz,
    _make_class_once,
    _make_namespace_function,
    _new_context_var,
    _new_lock,
    _new_module,
    _new_type,
    _no_traceback,
    _rebuild_cached_property,
    _rebuild_from_state,
    _rebuild_lru_cache,
    _rebuild_singledispatch,
    _rebuild_tensor,
    _rebuild_view,
    _rematch,
    _reopen,
    _restart_generator,
    _set_namespace_function_state,
)

__all__ = ["PICKLE_PROTOCOL", "Pickled", "SameAs", "SyncPickler", "dumps", "loads"]

PICKLE_PROTOCOL = 5

#: Stack and recursion limit for the retry of a pickle too deep for the main thread.
_DEEP_STACK_BYTES = 512 * 1024 * 1024
_DEEP_RECURSION_LIMIT = 200_000


#: Real files: cloudpickle would read a file opened for reading in full and ship a StringIO
#: of its contents, at every capture. Files open for reading are reopened instead.
_FILE_TYPES = (
    io.FileIO,
    io.BufferedReader,
    io.BufferedWriter,
    io.BufferedRandom,
    io.BufferedRWPair,
    io.TextIOWrapper,
)


_NO_VALUE: Any = object()
_LOCK_TYPE = type(threading.Lock())
_RLOCK_TYPE = type(threading.RLock())


def _is_held(lock: Any) -> bool:
    if type(lock) is _RLOCK_TYPE:
        return "unlocked" not in repr(lock)  # RLock has no locked() before Python 3.14
    return bool(lock.locked())


@dataclass(frozen=True, slots=True)
class SameAs:
    """In a component's pickle, in place of a value: the same object as another slot's. For
    values pickle does not memoise (floats, ints): ``_ is Out[3]`` must hold after loading."""

    slot: str


@dataclass(frozen=True, slots=True)
class Pickled:
    """The bytes of one pickle and what did not survive in them (human-readable notes)."""

    data: bytes
    lossy: tuple[str, ...] = ()


# -- the pickler ----------------------------------------------------------------------------


def _is_notebook_object(obj: Any, namespace: dict[str, Any] | None) -> bool:
    """Defined in the notebook (``__main__``), hence not importable by name elsewhere."""
    module = getattr(obj, "__module__", None)
    if module == "__main__":
        return True
    wrapped = getattr(obj, "__wrapped__", None)
    return getattr(wrapped, "__globals__", None) is namespace and namespace is not None


class SyncPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle with the reducers described in this module's docstring. ``namespace`` is
    the user namespace: functions whose globals it is are rebuilt bound to the loader's
    namespace; ``travels`` says which of their globals are pickled with them (the others
    travel under their own names)."""

    def __init__(
        self,
        file: io.BytesIO,
        namespace: dict[str, Any] | None,
        travels: Callable[[str], bool],
        views: Container[int] = (),
    ) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._namespace = namespace
        self._travels = travels
        #: ids of the NumPy arrays that may be pickled as views of their base (``_graph``)
        self._views = views
        #: torch storages already seen: key -> a uint8 tensor over the whole storage
        self._storages: dict[tuple[Any, ...], Any] = {}
        self.lossy: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _FILE_TYPES):
            return self._file_reduce(obj)
        if obj is self._namespace and obj is not None:
            raise pickle.PicklingError("cannot synchronise the namespace itself")
        kind = type(obj)
        if kind is types.CellType:
            # An empty cell first (memoised, so closures sharing it share it after loading,
            # and a function in its own cell is no cycle), then its value.
            try:
                value = obj.cell_contents
            except ValueError:
                value = _EMPTY
            return _empty_cell, (), value, None, None, _fill_cell
        if kind is types.CodeType:
            # marshal version 2: no back-references, so equal code gives equal bytes.
            return _load_code, (marshal.dumps(obj, 2),)
        if kind is types.ModuleType:
            return self._module_reduce(obj)
        if kind is types.TracebackType:
            self.lossy.append("its traceback (traceback objects cannot be copied)")
            return _no_traceback, ()
        if isinstance(obj, BaseException) and obj.__traceback__ is not None:
            # Exceptions pickle without their traceback: say so instead of losing it quietly.
            self.lossy.append("its traceback (traceback objects cannot be copied)")
        if kind is _LOCK_TYPE or kind is _RLOCK_TYPE:
            if _is_held(obj):
                raise pickle.PicklingError("cannot synchronise a lock that is held")
            return _new_lock, (kind is _RLOCK_TYPE,)
        if kind is types.GeneratorType:
            return self._generator_reduce(obj)
        if kind is contextvars.ContextVar:
            # The value set in the executor's context becomes the default, as a cell sees it.
            current = obj.get(_NO_VALUE)
            has_default = current is not _NO_VALUE
            return _new_context_var, (obj.name, current if has_default else None, has_default)
        if kind is re.Match:
            return _rematch, (obj.re, obj.string, obj.start(), obj.endpos)
        if kind is weakref.ReferenceType:
            referent = obj()
            if referent is None:
                raise pickle.PicklingError("cannot synchronise a dead weak reference")
            return weakref.ref, (referent,)
        if kind.__name__ == "NpzFile" and (kind.__module__ or "").startswith("numpy"):
            # np.load of an .npz keeps the file open: open it again where it is loaded.
            name = getattr(obj.fid, "name", None)
            if obj.fid is None or not isinstance(name, str):
                raise pickle.PicklingError("cannot synchronise a closed NpzFile")
            # (As given: a relative name is relative to the working directory, which follows.)
            return _load_npz, (name, bool(obj.allow_pickle))
        if kind.__name__ == "CallbackRegistry" and kind.__module__ == "matplotlib.cbook":
            # Its __getstate__ draws the next callback id: pickling must not change the
            # value (the next mpl_connect would return another id than in a local kernel).
            state = obj.__getstate__()
            obj._cid_gen = itertools.count(state["_cid_gen"])
            return _rebuild_from_state, (kind, state)
        reduced = self._notebook_reduce(obj)
        if reduced is not None:
            return reduced
        torch = sys.modules.get("torch")
        if torch is not None and (kind is torch.Tensor or kind is torch.nn.Parameter):
            reduced = self._tensor_reduce(obj, torch)
            if reduced is not None:
                return reduced
        root = numpy_view_root(obj) if id(obj) in self._views else None
        if root is not None:
            offset = obj.__array_interface__["data"][0] - root.__array_interface__["data"][0]
            return _rebuild_view, (root, obj.shape, obj.dtype, offset, obj.strides)
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) == 6:
            reduced = self._class_reduce(obj, self._without_slotnames(reduced))
        return reduced

    @staticmethod
    def _class_reduce(cls: type, reduced: tuple[Any, ...]) -> tuple[Any, ...]:
        """A notebook class by value, rebuilt by ``_make_class_once``: with its ``__slots__``
        (cloudpickle gives the skeleton none, so instances would get a ``__dict__`` and lose
        the slots' values) and its ``__qualname__`` (``Outer.Inner``, ``f.<locals>.C``)."""
        if reduced[0] is not cloudpickle_impl._make_skeleton_class:
            return reduced  # enums and others: cloudpickle's own way
        newargs = list(reduced[1])
        type_kwargs = dict(newargs[3])
        # (Not through __mro_entries__ bases: NamedTuple makes its own slots.)
        if "__slots__" in cls.__dict__ and all(isinstance(b, type) for b in newargs[2]):
            type_kwargs["__slots__"] = cls.__dict__["__slots__"]
        type_kwargs["__qualname__"] = cls.__qualname__
        newargs[3] = type_kwargs
        return (_make_class_once, tuple(newargs), *reduced[2:])

    def _tensor_reduce(self, tensor: Any, torch: Any) -> Any | None:
        """A torch tensor (or parameter) as a window on its storage, the storage pickled once
        per pickle: views (``flat = x.view(-1)``) stay views, and ``.grad`` arrives (torch's
        own pickling drops it, so an optimizer's next step would differ)."""
        if any(tensor is h for h in self._storages.values()):
            return None  # a storage holder itself: torch's own way
        if tensor.layout is not torch.strided or tensor.is_quantized or tensor.is_meta:
            return None
        if tensor.__dict__:
            return None  # attributes: torch's own way
        if tensor.requires_grad and not tensor.is_leaf:
            # The autograd graph (grad_fn) cannot be copied: it arrives as a leaf.
            self.lossy.append("its autograd graph (it arrives as a leaf tensor without grad_fn)")
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(storage.device), storage.nbytes())
        holder = self._storages.get(key)
        if holder is None:
            origin = _host_copies.device_origin(storage)
            if origin is None:
                holder = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            else:
                # GPU memory travels as host bytes: the other replicas have no GPU bound and
                # keep it in host memory until they run a cell with GPUs (``_rebuild``).
                holder = _host_copies.HostCopy(origin, _host_copies.host_bytes(torch, storage))
            self._storages[key] = holder
        return _rebuild_tensor, (
            holder,
            tensor.dtype,
            tensor.storage_offset(),
            tuple(tensor.size()),
            tuple(tensor.stride()),
            tensor.requires_grad,
            tensor.grad if tensor.is_leaf else None,  # (.grad of a non-leaf warns)
            type(tensor) is torch.nn.Parameter,
        )

    def _generator_reduce(self, gen: Any) -> Any:
        """A generator that has not started yet (``g = (x * x for x in data)``, ``g = f(3)``)
        is rebuilt by calling its code again with the arguments its frame holds; one in
        progress cannot be copied (CPython cannot rebuild a suspended frame)."""
        if inspect.getgeneratorstate(gen) != inspect.GEN_CREATED:
            raise pickle.PicklingError("a generator in progress cannot be copied")
        frame, code = gen.gi_frame, gen.gi_code
        if frame.f_globals is not self._namespace:
            raise pickle.PicklingError("a generator of an installed module cannot be copied")
        values = frame.f_locals
        count = code.co_argcount + code.co_kwonlyargcount
        names = code.co_varnames[:count]
        positional = [values[n] for n in names[: code.co_argcount]]
        keywords = {n: values[n] for n in names[code.co_argcount :]}
        if code.co_flags & inspect.CO_VARARGS:
            positional.extend(values[code.co_varnames[count]])
            count += 1
        if code.co_flags & inspect.CO_VARKEYWORDS:
            keywords.update(values[code.co_varnames[count]])
        closure = tuple(values[n] for n in code.co_freevars) if code.co_freevars else None
        if any(n.startswith(".") for n in keywords):  # ``.0`` only ever comes positionally
            raise pickle.PicklingError("cannot rebuild this generator's arguments")
        return _restart_generator, (code, tuple(positional), keywords, closure)

    @staticmethod
    def _file_reduce(file: Any) -> Any:
        """A file open for reading is opened again at the same position where it is loaded
        (the same path must exist there: the working directory follows the executor); other
        files are refused (reopening for writing could truncate or interleave)."""
        mode = getattr(file, "mode", "")
        name = getattr(file, "name", None)
        if not isinstance(name, str) or not isinstance(mode, str) or set(mode) - set("rbt"):
            raise pickle.PicklingError(
                f"cannot synchronise a file open for writing ({type(file).__name__})"
            )
        if file.closed:
            raise pickle.PicklingError("cannot synchronise a closed file")
        encoding = getattr(file, "encoding", None) if "b" not in mode else None
        return _reopen, (os.path.abspath(name), mode, encoding, file.tell())

    def _notebook_reduce(self, obj: Any) -> Any | None:
        """Reducers for decorated callables and typing objects defined in the notebook."""
        namespace = self._namespace
        if isinstance(obj, functools._lru_cache_wrapper):
            if not _is_notebook_object(obj, namespace):
                return None
            if obj.cache_info().currsize:
                self.lossy.append(
                    "its cache (it starts empty there, so results are recomputed and "
                    "cache_info() counts anew)"
                )
            params = obj.cache_parameters()
            return _rebuild_lru_cache, (obj.__wrapped__, params["maxsize"], params["typed"])
        if isinstance(obj, functools.cached_property):
            return _rebuild_cached_property, (obj.func, obj.attrname, obj.__doc__)
        if isinstance(obj, typing.NewType) and obj.__module__ == "__main__":
            return _new_type, (obj.__name__, obj.__supertype__, obj.__module__)
        if (
            isinstance(obj, types.FunctionType)
            and hasattr(obj, "registry")
            and hasattr(obj, "dispatch")
            and _is_notebook_object(obj, namespace)
        ):
            registry = obj.registry
            known = {"registry", "dispatch", "register", "_clear_cache", "__wrapped__"}
            extra = {
                k: v for k, v in vars(obj).items() if k not in known and not k.startswith("__")
            }
            items = [(cls, fn) for cls, fn in registry.items() if cls is not object]
            return _rebuild_singledispatch, (registry[object], items, extra)
        return None

    def _module_reduce(self, module: types.ModuleType) -> Any:
        name = module.__name__
        if module.__dict__ is self._namespace:
            raise pickle.PicklingError("cannot synchronise the notebook's own module")
        registered = sys.modules.get(name) is module
        if not registered or _is_dynamic(module):
            # Made in the notebook (types.ModuleType, maybe put in sys.modules): by value,
            # registered again where it is loaded so that ``import name`` finds it there too.
            state = {k: v for k, v in module.__dict__.items() if k != "__builtins__"}
            return _new_module, (name, registered), state, None, None, _fill_module
        prefix = name + "."
        submodules = sorted(
            sub
            for sub, loaded in list(sys.modules.items())
            if sub.startswith(prefix) and loaded is not None
        )
        return _import_module, (name, submodules)

    @staticmethod
    def _without_slotnames(reduced: tuple[Any, ...]) -> tuple[Any, ...]:
        """Leave out ``__slotnames__`` of a class pickled by value: a cache that ``copyreg``
        adds the first time an instance is pickled, which would make the class look changed."""
        state = reduced[2]
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and isinstance(state[0], dict)
            and "__slotnames__" in state[0]
        ):
            attributes = {k: v for k, v in state[0].items() if k != "__slotnames__"}
            return (*reduced[:2], (attributes, state[1]), *reduced[3:])
        return reduced

    def _dynamic_function_reduce(self, func: Any) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        if self._namespace is None or func.__globals__ is not self._namespace:
            return reduced
        try:
            newargs, state = reduced[1], reduced[2]
            code, closure = newargs[0], newargs[4]
            attributes, slots = state
            carried = slots["__globals__"]
        except (IndexError, KeyError, TypeError, ValueError):  # cloudpickle changed
            raise pickle.PicklingError(
                "unexpected cloudpickle function reduction (cloudpickle version not supported)"
            ) from None
        keep = self._travels
        slots = {**slots, "__globals__": {k: v for k, v in carried.items() if keep(k)}}
        if closure is not None:
            closure = func.__closure__  # the cells themselves: see _set_namespace_function_state
        return (
            _make_namespace_function,
            (code, closure),
            (attributes, slots),
            None,
            None,
            _set_namespace_function_state,
        )


# -- entry points ---------------------------------------------------------------------------

_T = TypeVar("_T")


def _on_deep_stack(work: Callable[[], _T]) -> _T:
    """Run ``work`` on a thread with a large stack and a raised recursion limit (for values
    too deep for the main thread's). The caller waits; nothing else runs cells meanwhile."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:
            outcome.append((False, exc))

    previous_stack = threading.stack_size()
    previous_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous_limit, _DEEP_RECURSION_LIMIT))
    try:
        threading.stack_size(_DEEP_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="nbcluster-deep-pickle", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous_stack)
        thread.join()
    finally:
        sys.setrecursionlimit(previous_limit)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def dumps(
    value: object,
    namespace: dict[str, Any] | None,
    travels: Callable[[str], bool],
    views: Container[int] = (),
) -> Pickled:
    """Pickle ``value`` for the other replicas (raises what pickling raises). ``views``: the
    NumPy arrays that stay views of their base (``_graph.shared_arrays``)."""

    def work() -> Pickled:
        buffer = io.BytesIO()
        pickler = SyncPickler(buffer, namespace, travels, views)
        pickler.dump(value)
        return Pickled(buffer.getvalue(), tuple(dict.fromkeys(pickler.lossy)))

    try:
        return work()
    except RecursionError:
        return _on_deep_stack(work)
    except pickle.PicklingError as exc:
        # cloudpickle turns a RecursionError into a PicklingError ("excessively deep").
        if not isinstance(exc.__cause__, RecursionError):
            raise
        return _on_deep_stack(work)


def loads(data: bytes, namespace: dict[str, Any] | None) -> Any:
    """Unpickle bytes written by ``dumps``, binding notebook functions to ``namespace``."""

    def work() -> Any:
        token = TARGET_NAMESPACE.set(namespace)
        try:
            return cloudpickle.loads(data)
        finally:
            TARGET_NAMESPACE.reset(token)

    try:
        return work()
    except RecursionError:
        return _on_deep_stack(work)
