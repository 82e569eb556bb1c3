"""State synchronisation between a kernel's replicas: the effect of a cell, by value.

After a cell ran on the executor replica, :meth:`StateSynchronizer.capture` pickles (with
cloudpickle) every user global, hashes the bytes (BLAKE2b-128) and compares them with the
hashes of the last synchronisation. New and changed values are shipped, deleted names are
listed; the result is a *payload*, a dict of primitives that :func:`encode_payload` turns into
msgpack for the replicated log. Every other replica feeds the committed payloads, in log
order, to :meth:`StateSynchronizer.apply`, which loads the values into its own namespace, so
that any replica can run the next cell with the same Python state.

Payload (every field a msgpack primitive)::

    {
        "count": 7,                                  # the cell's execution count
        "set": {                                     # new or changed values
            "x": {"h": "<32 hex>", "v": b"<cloudpickle bytes>"},          # inline
            "df": {"h": "<32 hex>", "ptr": "<store key>", "size": 12345},  # in the object store
        },
        "del": ["old"],            # names deleted since the last synchronisation
        "unpicklable": ["f"],      # names that newly could not be synchronised: replicas drop
                                   # any older value they hold (it would be stale)
        "source": "x = 1\\n...",    # the cell as compiled (IPython's transformed cell, so that
                                   # line numbers match): put in linecache on followers
        "filename": "<ipython-input-7-...>",  # the code filename IPython compiled the cell under
        "full": True,              # optional: "set" is the entire state (a snapshot): every
                                   # other synchronised name is deleted
    }

How values travel:

* Modules, and functions and classes of installed modules, pickle *by reference* (cloudpickle
  does that): ``import numpy as np`` ships "import numpy, bind it to np".
* Functions, lambdas, closures and classes defined in the notebook pickle *by value*. Functions
  whose globals are the user namespace are rebuilt on the follower with the follower's
  namespace as their globals (plain cloudpickle would give each a private copy of the globals
  it uses, which later cells could not update). The synchronised globals such a function uses
  are not copied into its pickle — they travel under their own names — so a function's bytes
  do not change when a global it reads does. Unsynchronised globals it uses (``_helper``)
  travel with it. Classes keep cloudpickle's tracking id, so an instance shipped in a later
  cell is an instance of the class the follower already has.
* Values whose pickle is larger than ``threshold`` (or that would make the record exceed
  ``inline_budget``) are written to the :class:`~nbcluster.store.ObjectStore` under a
  content-addressed key before the payload is returned; only the pointer enters the log.
* Values that cannot be pickled (open files, sockets, generators, locks ...) are never fatal:
  their names are reported (once, while they stay unpicklable) and followers drop any older
  value they had under those names.

Limits: each name is pickled on its own, so two names bound to one object (``b = a``), or
objects reachable from two names, become separate copies on followers. Every picklable global
is pickled again at each capture to detect in-place changes (immutable scalars, ``str`` and
``bytes`` still bound to the same object are skipped), so capture time grows with the size of
the namespace. Values whose pickle changes without a change of value (``__getstate__`` with a
timestamp, ...) are shipped at every capture.

Not thread-safe: one caller at a time, and nothing may run cells in the namespace while
``capture`` or ``apply`` is in progress. Unpickling runs code from the payload: only apply
payloads from the kernel's own replicas.
"""

from __future__ import annotations

import builtins
import contextvars
import io
import linecache
import logging
import pickle
import re
import time
import types
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict, cast

import cloudpickle  # type: ignore[import-untyped]
import msgpack
import xxhash

from ..store import ObjectStore

__all__ = [
    "DEFAULT_INLINE_BUDGET",
    "DEFAULT_THRESHOLD",
    "ApplyResult",
    "InlineEntry",
    "PointerEntry",
    "StateSynchronizer",
    "SyncPayload",
    "SyncResult",
    "decode_payload",
    "encode_payload",
    "validate_payload",
]

log = logging.getLogger(__name__)

#: Values whose pickle is larger than this go to the object store (bytes).
DEFAULT_THRESHOLD = 1024 * 1024
#: The inline values of one payload add up to at most this; further values go to the store.
DEFAULT_INLINE_BUDGET = 8 * 1024 * 1024

PICKLE_PROTOCOL = 5

_MISSING: Any = object()


class InlineEntry(TypedDict):
    h: str
    v: bytes


class PointerEntry(TypedDict):
    h: str
    ptr: str
    size: int


SyncPayload = TypedDict(
    "SyncPayload",
    {
        "count": int,
        "set": dict[str, InlineEntry | PointerEntry],
        "del": list[str],
        "unpicklable": list[str],
        "source": str,
        "filename": str,
        "full": NotRequired[bool],
    },
)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What :meth:`StateSynchronizer.capture` found."""

    #: The execution count given to ``capture``.
    count: int
    #: The payload to replicate, or ``None`` when nothing changed.
    payload: SyncPayload | None
    #: Names that just became unpicklable: warn the user about these now (sorted).
    unpicklable_new: tuple[str, ...] = ()
    #: Every name that cannot be pickled at the moment (sorted).
    unpicklable: tuple[str, ...] = ()
    #: Names not synchronised for another reason (object store failure): name -> reason.
    #: Followers drop them; the next capture tries again.
    failed: Mapping[str, str] = field(default_factory=dict)
    #: Names whose values went to the object store (sorted).
    stored: tuple[str, ...] = ()
    #: Bytes of pickled values in the payload, inline and in the store.
    inline_bytes: int = 0
    stored_bytes: int = 0
    #: Wall time the capture took, in seconds.
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`StateSynchronizer.apply` did."""

    count: int
    #: Names whose values were loaded (sorted); values already held were not reloaded.
    loaded: tuple[str, ...] = ()
    #: Names deleted from the namespace (sorted).
    deleted: tuple[str, ...] = ()
    #: Names dropped because the executor could not synchronise them (sorted).
    dropped: tuple[str, ...] = ()
    #: Names that could not be applied: name -> reason. Their old values are removed.
    failed: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# -- payload encoding ----------------------------------------------------------------------

_HEX128 = re.compile(r"[0-9a-f]{32}")
_REQUIRED = ("count", "set", "del")
_OPTIONAL = ("unpicklable", "source", "filename", "full")
_MAX_COUNT = 2**63 - 1


def _fail(problem: str) -> ValueError:
    return ValueError(f"malformed sync payload: {problem}")


def _names(value: object, where: str) -> list[str]:
    if not isinstance(value, list | tuple):
        raise _fail(f"{where!r} must be a list of names, got {type(value).__name__}")
    seen: set[str] = set()
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}[{i}] must be a non-empty str, got {name!r:.80}")
        if name in seen:
            raise _fail(f"{where!r} lists {name!r} twice")
        seen.add(name)
    return list(value)


def _entry(name: str, entry: object) -> InlineEntry | PointerEntry:
    where = f"set[{name!r}]"
    if not isinstance(entry, dict):
        raise _fail(f"{where} must be a map, got {type(entry).__name__}")
    digest = entry.get("h")
    if not isinstance(digest, str) or not _HEX128.fullmatch(digest):
        raise _fail(f"{where}: 'h' must be 32 lowercase hex digits, got {digest!r:.80}")
    keys = set(entry)
    if keys == {"h", "v"}:
        data = entry["v"]
        if not isinstance(data, bytes):
            raise _fail(f"{where}: 'v' must be bytes, got {type(data).__name__}")
        return InlineEntry(h=digest, v=data)
    if keys == {"h", "ptr", "size"}:
        ptr, size = entry["ptr"], entry["size"]
        if not isinstance(ptr, str) or not ptr:
            raise _fail(f"{where}: 'ptr' must be a non-empty str, got {ptr!r:.80}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(f"{where}: 'size' must be an int >= 0, got {size!r:.80}")
        return PointerEntry(h=digest, ptr=ptr, size=size)
    raise _fail(
        f"{where} must have the fields h and v (inline) or h, ptr and size (pointer); "
        f"it has {sorted(map(str, keys))}"
    )


def validate_payload(payload: object) -> SyncPayload:
    """Check a payload's shape and return a normalised copy (optional fields filled in).

    Raises ``ValueError`` whose message names the problem.
    """
    if not isinstance(payload, Mapping):
        raise _fail(f"must be a map, got {type(payload).__name__}")
    for key in payload:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise _fail(f"unknown field {key!r:.80}")
    for key in _REQUIRED:
        if key not in payload:
            raise _fail(f"missing field {key!r}")
    count = payload["count"]
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= _MAX_COUNT:
        raise _fail(f"'count' must be an int in [0, 2**63), got {count!r:.80}")
    values = payload["set"]
    if not isinstance(values, Mapping):
        raise _fail(f"'set' must be a map, got {type(values).__name__}")
    entries: dict[str, InlineEntry | PointerEntry] = {}
    for name, entry in values.items():
        if not isinstance(name, str) or not name:
            raise _fail(f"'set' keys must be non-empty str, got {name!r:.80}")
        entries[name] = _entry(name, entry)
    deleted = _names(payload["del"], "del")
    unpicklable = _names(payload.get("unpicklable", []), "unpicklable")
    for name in deleted:
        if name in entries:
            raise _fail(f"{name!r} is both in 'set' and in 'del'")
    for name in unpicklable:
        if name in entries or name in deleted:
            raise _fail(f"{name!r} is in 'unpicklable' and in 'set' or 'del'")
    source = payload.get("source", "")
    filename = payload.get("filename", "")
    if not isinstance(source, str):
        raise _fail(f"'source' must be a str, got {type(source).__name__}")
    if not isinstance(filename, str):
        raise _fail(f"'filename' must be a str, got {type(filename).__name__}")
    result: SyncPayload = {
        "count": count,
        "set": entries,
        "del": deleted,
        "unpicklable": unpicklable,
        "source": source,
        "filename": filename,
    }
    if "full" in payload:
        full = payload["full"]
        if not isinstance(full, bool):
            raise _fail(f"'full' must be a bool, got {type(full).__name__}")
        result["full"] = full
    return result


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Validate and pack a payload as msgpack (``ValueError`` if it is malformed)."""
    checked = validate_payload(payload)
    data: bytes = msgpack.packb(checked, use_bin_type=True)
    return data


def decode_payload(data: bytes) -> SyncPayload:
    """Unpack and validate a payload; ``ValueError`` naming the problem if it is malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail(f"expected bytes, got {type(data).__name__}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise _fail(f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    return validate_payload(raw)


# -- pickling ------------------------------------------------------------------------------

#: The namespace that functions unpickled by :meth:`StateSynchronizer.apply` are bound to.
_TARGET_NAMESPACE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "nbcluster_sync_target_namespace", default=None
)

#: Real files: cloudpickle would read a file opened for reading in full and ship a StringIO
#: of its contents, at every capture. They are treated as unpicklable instead.
_FILE_TYPES = (
    io.FileIO,
    io.BufferedReader,
    io.BufferedWriter,
    io.BufferedRandom,
    io.BufferedRWPair,
    io.TextIOWrapper,
)

#: Immutable types whose values pickle the same as long as the object is the same: a name
#: still bound to the same object is not pickled again.
_IMMUTABLE_TYPES: frozenset[type] = frozenset(
    {int, float, complex, bool, str, bytes, range, type(None)}
)


def _make_namespace_function(code: types.CodeType, closure: tuple[Any, ...] | None) -> Any:
    """Unpickling: a notebook function, bound to the namespace being applied to."""
    namespace = _TARGET_NAMESPACE.get()
    if namespace is None:  # loaded outside apply(): a namespace of its own
        namespace = {"__builtins__": builtins}
    return types.FunctionType(code, namespace, None, None, closure)


def _set_namespace_function_state(func: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Unpickling: cloudpickle's ``_function_setstate`` minus its ``__builtins__`` write into
    the (shared) globals."""
    attributes, slots = state
    func.__dict__.update(attributes)
    slots = dict(slots)
    carried = slots.pop("__globals__", {})
    closure = slots.pop("__closure__", None)
    slots.pop("_cloudpickle_submodules", None)  # only kept the submodules imported
    func.__globals__.update(carried)
    if closure is not None:
        for i, cell in enumerate(closure):
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            func.__closure__[i].cell_contents = value
    for name, value in slots.items():
        setattr(func, name, value)


def _digest(data: bytes) -> str:
    # XXH3-128: a 200 MB array is hashed in ~15 ms (BLAKE2b took ~300 ms). The digest detects
    # changed values and damaged objects; nothing here needs it to resist forgery (the Raft
    # traffic that carries it is authenticated and encrypted).
    return str(xxhash.xxh3_128_hexdigest(data))


class _SyncPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle, with notebook functions bound to the namespace they are loaded into and
    open files refused."""

    def __init__(self, file: io.BytesIO, sync: StateSynchronizer) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._sync = sync

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _FILE_TYPES):
            raise pickle.PicklingError(f"cannot synchronise an open file ({type(obj).__name__})")
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) == 6:
            reduced = self._without_slotnames(reduced)
        return reduced

    @staticmethod
    def _without_slotnames(reduced: tuple[Any, ...]) -> tuple[Any, ...]:
        """Leave out ``__slotnames__`` of a class pickled by value: a cache that ``copyreg``
        adds to a class the first time one of its instances is pickled, which would otherwise
        make the class look changed (and ship again) after that."""
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
        if func.__globals__ is not self._sync.namespace:
            return reduced
        try:
            newargs, state = reduced[1], reduced[2]
            code, closure = newargs[0], newargs[4]
            attributes, slots = state
            carried = slots["__globals__"]
        except (IndexError, KeyError, TypeError, ValueError):  # cloudpickle changed: fall back
            log.warning("unexpected cloudpickle function reduction; functions keep own globals")
            return reduced
        keep = self._sync.travels_with_function
        slots = {**slots, "__globals__": {k: v for k, v in carried.items() if keep(k)}}
        return (
            _make_namespace_function,
            (code, closure),
            (attributes, slots),
            None,
            None,
            _set_namespace_function_state,
        )


# -- the synchroniser ----------------------------------------------------------------------


class StateSynchronizer:
    """Keeps one replica's user namespace in step with the other replicas'.

    ``namespace`` is the user namespace (IPython's ``shell.user_ns``); ``hidden`` the names
    that are IPython machinery (``shell.user_ns_hidden``; kept by reference, so later additions
    count). Names in ``hidden`` and names starting with ``_`` are not synchronised.
    ``threshold``: values whose pickle is larger go to ``store``; ``inline_budget``: the inline
    values of one payload add up to at most this. ``key_prefix`` starts every store key (use
    one per kernel when kernels share a store).
    """

    def __init__(
        self,
        namespace: dict[str, Any],
        hidden: Container[str],
        store: ObjectStore,
        threshold: int = DEFAULT_THRESHOLD,
        *,
        inline_budget: int = DEFAULT_INLINE_BUDGET,
        key_prefix: str = "sync/",
    ) -> None:
        if threshold < 0 or inline_budget < 0:
            raise ValueError("threshold and inline_budget must be >= 0")
        self.namespace = namespace
        self.hidden = hidden
        self.store = store
        self.threshold = threshold
        self.inline_budget = inline_budget
        self.key_prefix = key_prefix
        #: name -> hash of the value every replica holds (as shipped by the executor)
        self._hashes: dict[str, str] = {}
        #: name -> hash of this process's own pickle of a value loaded here, where it differs
        #: from the shipped bytes (string interning, set order): still the same value.
        self._local: dict[str, str] = {}
        #: name -> the (immutable) object last synchronised under it
        self._same: dict[str, object] = {}
        #: names present on the executor but not synchronised: followers dropped them
        self._dropped: set[str] = set()
        #: names that could not be pickled at the last capture
        self._unpicklable: set[str] = set()

    # -- which names ------------------------------------------------------------------------

    def is_synced(self, name: object) -> bool:
        """Whether a namespace entry is synchronised (user state, not IPython machinery)."""
        return isinstance(name, str) and not name.startswith("_") and name not in self.hidden

    def travels_with_function(self, name: str) -> bool:
        """Whether a global used by a notebook function is pickled along with it: those not
        synchronised by name, except IPython machinery and dunders."""
        return (
            not self.is_synced(name)
            and name not in self.hidden
            and not (name.startswith("__") and name.endswith("__"))
        )

    @property
    def hashes(self) -> dict[str, str]:
        """A copy of the name -> hash table of the synchronised state."""
        return dict(self._hashes)

    @property
    def not_synchronized(self) -> frozenset[str]:
        """Names the executor has but could not synchronise (on a follower: names that were
        lost, whose old values were dropped)."""
        return frozenset(self._dropped)

    # -- executor side ----------------------------------------------------------------------

    def dumps(self, value: object) -> bytes:
        """Pickle a value as it is synchronised (cloudpickle, notebook functions rebound)."""
        if value is self.namespace:
            raise pickle.PicklingError("cannot synchronise the namespace itself")
        buffer = io.BytesIO()
        _SyncPickler(buffer, self).dump(value)
        return buffer.getvalue()

    def capture(self, execution_count: int, source: str = "", filename: str = "") -> SyncResult:
        """Diff the namespace against the last synchronisation and build the payload.

        Values for the object store are written before this returns. Never raises for a value
        that cannot be pickled or stored; such names are reported in the result. The diff
        state is updated only at the end: if the capture is interrupted (``KeyboardInterrupt``),
        the next capture ships everything this one would have.
        """
        started = time.perf_counter()
        current = {k: v for k, v in list(self.namespace.items()) if self.is_synced(k)}
        entries: dict[str, InlineEntry | PointerEntry] = {}
        seen: dict[str, object] = {}  # picklable names -> value, for the identity shortcut
        unpicklable: set[str] = set()
        not_synced: set[str] = set()  # unpicklable or not stored
        failed: dict[str, str] = {}
        stored: list[str] = []
        inline_bytes = stored_bytes = 0

        for name in sorted(current):
            value = current[name]
            if name in self._hashes and self._same.get(name, _MISSING) is value:
                continue
            try:
                data = self.dumps(value)
            except Exception as exc:
                log.debug("cannot pickle %r: %s: %s", name, type(exc).__name__, exc)
                unpicklable.add(name)
                not_synced.add(name)
                continue
            digest = _digest(data)
            if digest == self._hashes.get(name) or digest == self._local.get(name):
                seen[name] = value
                continue
            entry: InlineEntry | PointerEntry
            if len(data) > self.threshold or inline_bytes + len(data) > self.inline_budget:
                key = self.key_prefix + digest
                try:
                    self.store.put(key, data)
                except Exception as exc:
                    log.warning("cannot store %r (%d bytes) as %r: %s", name, len(data), key, exc)
                    failed[name] = f"object store: {type(exc).__name__}: {exc}"
                    not_synced.add(name)
                    continue
                entry = PointerEntry(h=digest, ptr=key, size=len(data))
                stored.append(name)
                stored_bytes += len(data)
            else:
                entry = InlineEntry(h=digest, v=data)
                inline_bytes += len(data)
            entries[name] = entry
            seen[name] = value

        # commit
        deleted = sorted(n for n in self._hashes.keys() | self._dropped if n not in current)
        for name in deleted:
            self._forget(name)
            self._dropped.discard(name)
        newly_dropped = sorted(not_synced - self._dropped)
        for name in not_synced:
            self._forget(name)
        self._dropped |= not_synced
        for name, entry in entries.items():
            self._local.pop(name, None)
            self._hashes[name] = entry["h"]
            self._dropped.discard(name)
        for name, value in seen.items():
            self._remember(name, value)
        unpicklable_new = tuple(sorted(unpicklable - self._unpicklable))
        self._unpicklable = unpicklable

        payload: SyncPayload | None = None
        if entries or deleted or newly_dropped:
            payload = {
                "count": execution_count,
                "set": entries,
                "del": deleted,
                "unpicklable": newly_dropped,
                "source": source,
                "filename": filename,
            }
        seconds = time.perf_counter() - started
        log.debug(
            "capture %d: %d set (%d B inline, %d B stored), %d deleted, %d unpicklable in %.3f s",
            execution_count,
            len(entries),
            inline_bytes,
            stored_bytes,
            len(deleted),
            len(unpicklable),
            seconds,
        )
        return SyncResult(
            count=execution_count,
            payload=payload,
            unpicklable_new=unpicklable_new,
            unpicklable=tuple(sorted(unpicklable)),
            failed=failed,
            stored=tuple(stored),
            inline_bytes=inline_bytes,
            stored_bytes=stored_bytes,
            seconds=seconds,
        )

    # -- follower side ----------------------------------------------------------------------

    def apply(self, payload: Mapping[str, Any]) -> ApplyResult:
        """Apply a payload captured on another replica (raises ``ValueError`` if malformed).

        Values this replica already holds (same hash) are not reloaded, so applying a
        replica's own payload is harmless. A value that cannot be fetched, fails its hash or
        cannot be unpickled here is logged, reported in ``failed`` and its old value removed;
        the rest is applied.
        """
        started = time.perf_counter()
        checked = validate_payload(payload)
        self._register_source(checked["filename"], checked["source"])
        failed: dict[str, str] = {}
        deleted: list[str] = []
        dropped: list[str] = []
        loaded: list[str] = []

        def synced(name: str) -> bool:
            if not self.is_synced(name):
                failed[name] = "not a synchronised name (IPython machinery or private)"
                log.warning("sync payload %d: ignored %r: not synchronised", checked["count"], name)
                return False
            return True

        for name in filter(synced, checked["del"]):
            if self.namespace.pop(name, _MISSING) is not _MISSING:
                deleted.append(name)
            self._forget(name)
            self._dropped.discard(name)
        for name in filter(synced, checked["unpicklable"]):
            if name in self._dropped:
                continue  # already dropped (or this replica's own payload)
            if self.namespace.pop(name, _MISSING) is not _MISSING:
                dropped.append(name)
            self._forget(name)
            self._dropped.add(name)

        token = _TARGET_NAMESPACE.set(self.namespace)
        try:
            for name in sorted(filter(synced, checked["set"])):
                entry = checked["set"][name]
                if self._hashes.get(name) == entry["h"] and name in self.namespace:
                    continue
                self._dropped.discard(name)
                try:
                    value = self._load(entry)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "sync payload %d: cannot load %r: %s", checked["count"], name, reason
                    )
                    failed[name] = reason
                    self.namespace.pop(name, None)
                    self._forget(name)
                    # Keep the hash: if this replica executes next, its payload deletes the
                    # name on the others, so that every replica agrees with the executor.
                    self._hashes[name] = entry["h"]
                    continue
                self.namespace[name] = value
                self._forget(name)
                self._hashes[name] = entry["h"]
                self._remember(name, value)
                loaded.append(name)
        finally:
            _TARGET_NAMESPACE.reset(token)
        # This process may pickle what it just loaded differently from the executor (string
        # interning, set order); and loading an instance re-sets its class's attributes, which
        # can change how the class pickles here. Note this process's hashes of those values.
        inline = [n for n in loaded if "v" in checked["set"][n]]
        classes = [n for n in self._hashes if isinstance(self.namespace.get(n), type)]
        for name in dict.fromkeys(inline + classes):
            self._note_local_hash(name)

        if checked.get("full"):
            keep = checked["set"].keys() | set(checked["unpicklable"])
            for name in [n for n in self.namespace if self.is_synced(n) and n not in keep]:
                del self.namespace[name]
                deleted.append(name)
            for name in (self._hashes.keys() | self._dropped) - keep:
                self._forget(name)
                self._dropped.discard(name)
        return ApplyResult(
            count=checked["count"],
            loaded=tuple(loaded),
            deleted=tuple(sorted(deleted)),
            dropped=tuple(sorted(dropped)),
            failed=failed,
            seconds=time.perf_counter() - started,
        )

    def _load(self, entry: InlineEntry | PointerEntry) -> object:
        if "v" in entry:
            data = cast(InlineEntry, entry)["v"]
        else:
            pointer = entry
            data = self.store.get(pointer["ptr"])
            if len(data) != pointer["size"]:
                raise ValueError(
                    f"object {pointer['ptr']!r} has {len(data)} bytes, expected {pointer['size']}"
                )
        if _digest(data) != entry["h"]:
            raise ValueError("hash mismatch: the pickled bytes are not the ones announced")
        return cloudpickle.loads(data)

    def _note_local_hash(self, name: str) -> None:
        """Pickle a value as loaded here: if this process's bytes differ from the shipped ones,
        remember their hash as meaning the same value, so that a capture here (after this
        replica becomes the executor) does not ship it again."""
        try:
            local = _digest(self.dumps(self.namespace[name]))
        except Exception:
            return
        if local == self._hashes.get(name):
            self._local.pop(name, None)
        else:
            self._local[name] = local

    # -- helpers ----------------------------------------------------------------------------

    def _remember(self, name: str, value: object) -> None:
        if type(value) in _IMMUTABLE_TYPES:
            self._same[name] = value
        else:
            self._same.pop(name, None)

    def _forget(self, name: str) -> None:
        self._hashes.pop(name, None)
        self._local.pop(name, None)
        self._same.pop(name, None)

    @staticmethod
    def _register_source(filename: str, source: str) -> None:
        """Put a cell's source in linecache, as IPython does for the cells it compiles, so that
        tracebacks and ``inspect.getsource`` work for code defined on another replica."""
        if not filename or not source:
            return
        lines = [line + "\n" for line in source.splitlines()]
        linecache.cache[filename] = (len(source), None, lines, filename)
