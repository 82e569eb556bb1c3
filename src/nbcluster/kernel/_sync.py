"""State synchronisation between a kernel's replicas: the effect of a cell, by value, with the
identities among names kept.

After a cell ran on the executor replica, :meth:`StateSynchronizer.capture` finds the slots
(user globals, IPython outputs, module attributes: see ``_payload``) the cell may have changed,
groups them with every other slot that shares an object with them (a *component*: ``b = a``,
a view and its array, a model and its optimizer), pickles each component whole (so pickle's
memo keeps the sharing), and ships the components whose bytes changed. Every other replica
feeds the committed payloads, in log order, to :meth:`StateSynchronizer.apply`, which loads
them into its own namespace, so that any replica can run the next cell with the same state.

Which slots a cell may have changed (the cost of a capture grows with these, not with the
namespace; ``docs/replication.md`` argues why this is safe):

* slots rebound, added or deleted (an identity check of every slot, a few microseconds per
  thousand names);
* slots the cell names (``_touched``), widened with the names used by the code they reach
  (functions called, methods of notebook classes), to a fixed point;
* every slot when the cell can reach globals without naming them (``globals()``, ``exec``,
  unvetted magics) or when no source is given;
* every slot sharing an object with one of those (the identity index: for each slot, the ids
  of the objects it reached when last walked).

Over 500 lines on purpose: one class for both sides of one protocol, whose capture and apply
share the diff state (objects held, component digests, the identity index); the pieces with
a job of their own live in the modules named above.

Not thread-safe: one caller at a time, and nothing may run cells in the namespace while
``capture`` or ``apply`` is in progress. Unpickling runs code from the payload: only apply
payloads from the kernel's own replicas. In a replica group they are: the records that carry
them and the store this synchroniser reads large values from are sealed with the kernel's
state key (``_seal``, ``_sealed``), and a value that does not open is refused like a damaged
one (its slot is reported in ``failed``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from collections.abc import Container, Iterable, Mapping
from typing import Any

import xxhash

from ..store import ObjectStore
from ._environment import ReplicaEnvironment
from ._graph import connected_components, reach, shared_arrays
from ._history import History
from ._modules import ModuleSlots
from ._payload import (
    Entry,
    SyncPayload,
    decode_payload,
    encode_payload,
    output_number,
    validate_payload,
)
from ._pickling import SameAs, dumps, loads
from ._recompute import Layouts, Rebuilds, same_value
from ._recompute import plan as plan_recompute
from ._results import ApplyResult, SyncResult
from ._touched import analyse_cell

__all__ = [
    "DEFAULT_INLINE_BUDGET",
    "DEFAULT_THRESHOLD",
    "ApplyResult",
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

_MISSING: Any = object()

#: IPython's history names: rebuilt from ``Out[N]`` and the inputs, never shipped themselves.
#: (``_``, ``__``, ``___`` are slots: a user may bind ``_`` himself, as singledispatch code does.)
_HISTORY_NAME = re.compile(r"_i{1,3}|_i\d+|_\d+|_i00|_ih|_oh|_dh")


_UNDERSCORES = frozenset({"_", "__", "___"})


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


@functools.lru_cache(maxsize=65536)
def _ordinary_name(name: str) -> bool:
    """Neither a dunder nor one of IPython's history names (cached: every capture asks it of
    every global)."""
    return not _is_dunder(name) and not _HISTORY_NAME.fullmatch(name)


def _component_values(slots: list[str], values: Mapping[str, object]) -> tuple[object, ...]:
    """The values of a component's slots, in order, an underscore that is one of the
    component's outputs as a reference to it (see ``SameAs``)."""
    outputs = {id(values[s]): s for s in slots if output_number(s) is not None}
    return tuple(
        SameAs(outputs[id(values[s])])
        if s in _UNDERSCORES and id(values[s]) in outputs
        else values[s]
        for s in slots
    )


def _close_figures(replaced: Iterable[object]) -> None:
    """A pyplot figure being replaced by its new copy is closed first: loading the copy
    registers it with pyplot (matplotlib's own unpickling), and the old one would otherwise
    stay registered (``plt.get_fignums()`` would list both, and the copy's number changes)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    figure_type = sys.modules["matplotlib.figure"].Figure
    for value in replaced:
        if isinstance(value, figure_type):
            pyplot.close(value)


def _digest(data: bytes) -> str:
    # XXH3-128: a 200 MB array is hashed in ~15 ms. The digest detects changed values and
    # damaged objects; it need not resist forgery: the records that carry it and the stored
    # objects it names are sealed with the kernel's state key (``_seal``).
    return str(xxhash.xxh3_128_hexdigest(data))


class StateSynchronizer:
    """Keeps one replica's user namespace in step with the other replicas'.

    ``namespace`` is the user namespace (IPython's ``shell.user_ns``); ``hidden`` the names
    that are IPython machinery (``shell.user_ns_hidden``, kept by reference so that later
    additions count); dunder names and IPython's history names are not synchronised either
    (the history follows through ``Out[N]`` slots and the inputs). ``shell``, when given, is
    the IPython shell whose history (``In``, ``Out``, ``_``, ``_iN``) follows the executor.
    ``threshold``: components whose pickle is larger go to ``store``; ``inline_budget``: the
    inline entries of one payload add up to at most this. ``key_prefix`` starts every store
    key (one per kernel when kernels share a store).
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
        shell: Any = None,
    ) -> None:
        if threshold < 0 or inline_budget < 0:
            raise ValueError("threshold and inline_budget must be >= 0")
        self.namespace = namespace
        self.hidden = hidden
        self.object_store = store
        self.threshold = threshold
        self.inline_budget = inline_budget
        self.key_prefix = key_prefix
        self.history = History(namespace, shell)
        self.environment = ReplicaEnvironment(shell)
        self.modules = ModuleSlots(namespace)
        #: slot -> the object it held at the last synchronisation (identity baseline)
        self._held: dict[str, object] = {}
        #: slot -> digest of the component entry that carries its value on every replica
        self._component: dict[str, str] = {}
        #: digest -> the slots that entry set
        self._members: dict[str, frozenset[str]] = {}
        #: digest of an entry loaded here -> digest of this process's own pickle of the same
        #: values, where they differ (string interning, set order): still the same values
        self._local: dict[str, str] = {}
        #: identity index: slot -> ids it reached when last walked; id -> slots reaching it
        self._reach: dict[str, frozenset[int]] = {}
        self._owners: dict[int, set[str]] = {}
        #: slots present on the executor but not synchronised: followers dropped them
        self._dropped: set[str] = set()
        #: slots that could not be pickled at the last capture
        self._unpicklable: set[str] = set()
        #: slots whose values hold the namespace itself (found by the current capture's walk)
        self._holding_namespace: set[str] = set()
        #: ``Out[N]`` slots found by the last ``_current`` (the walk pairs ``_`` with them)
        self._outputs: dict[str, object] = {}
        #: the copies here that are incomplete, and the cells that can rebuild them
        self._rebuilds = Rebuilds()

    # -- which slots ------------------------------------------------------------------------

    def is_synced(self, name: object) -> bool:
        """Whether a namespace entry is synchronised as a slot of its own."""
        if not isinstance(name, str):
            return False
        if name in _UNDERSCORES:  # IPython hides them, but they are the executor's values
            return True
        return name not in self.hidden and _ordinary_name(name)

    def travels_with_function(self, name: str) -> bool:
        """Whether a global used by a notebook function is pickled along with it: those not
        synchronised by name, except IPython machinery and dunders."""
        return not self.is_synced(name) and name not in self.hidden and not _is_dunder(name)

    @property
    def hashes(self) -> dict[str, str]:
        """slot -> digest of the component that carries it (equal on replicas in step)."""
        return dict(self._component)

    @property
    def not_synchronized(self) -> frozenset[str]:
        """Slots the executor has but could not synchronise (on a follower: slots that were
        lost, whose old values were dropped)."""
        return frozenset(self._dropped)

    def _current(self) -> dict[str, object]:
        # The one pass over the whole namespace a capture makes: ``is_synced`` inlined (a
        # thousand globals cost about 0.1 ms here, a function call per name twice that).
        hidden, ordinary, underscores = self.hidden, _ordinary_name, _UNDERSCORES
        slots = {
            k: v
            for k, v in list(self.namespace.items())
            if type(k) is str and (k in underscores or (k not in hidden and ordinary(k)))
        }
        self._outputs = self.history.output_slots()
        slots.update(self._outputs)
        slots.update(self.history.shell_slots())
        slots.update(self.modules.read())
        return slots

    # -- executor side ----------------------------------------------------------------------

    def dumps(self, value: object) -> bytes:
        """Pickle a value as it is synchronised (cloudpickle, notebook functions rebound)."""
        return dumps(value, self.namespace, self.travels_with_function).data

    def capture(
        self,
        execution_count: int,
        source: str = "",
        filename: str = "",
        raw: str | None = None,
        *,
        ran: bool = True,
    ) -> SyncResult:
        """Find what the cell changed and build the payload (see the module docstring).

        ``source`` is the cell as compiled (IPython's transformed cell); ``raw`` as typed
        (IPython's ``In`` history); ``ran``: the cell ran to its end (its package installs
        are replayed elsewhere). Values for the object store are written before this
        returns. Never raises for a value that cannot be pickled or stored; such slots are
        reported in the result. The diff state is updated only at the end: an interrupted
        capture leaves it as it was, and the next capture ships everything this one would.
        """
        started = time.perf_counter()
        effects = analyse_cell(source)
        new_modules = self.modules.note_stores(effects.attribute_stores)
        current = self._current()
        held = self._held
        changed = {s for s, v in current.items() if held.get(s, _MISSING) is not v}
        # (set operations on key views run in C: a few microseconds for a thousand names)
        deleted = sorted(
            (held.keys() - current.keys())
            | (self._component.keys() - current.keys())
            | (self._dropped - current.keys())
        )
        if effects.names is None:
            dirty = set(current)
        else:
            dirty = changed | (effects.names & current.keys()) | new_modules
            dirty |= self.modules.touched_by(dirty, current)
            dirty |= self._unpicklable & current.keys()  # retry: it may be picklable now
            # The shell runs the notebook's event callbacks around every cell: their code
            # counts as the cell's (the walk adds the globals they name).
            dirty |= {s for s in current if s[0] == "!"}
        reached = self._widen(dirty, current, effects.names is None)

        components = connected_components(reached)
        entries: list[Entry] = []
        unpicklable: set[str] = set()
        not_synced: set[str] = set()
        failed: dict[str, str] = {}
        lossy: dict[str, str] = {}
        stored: list[str] = []
        inline_bytes = stored_bytes = 0
        shipped: dict[str, str] = {}  # slot -> digest of its new entry
        for slots in components:
            for part, data, notes in self._pickle_component(slots, current, unpicklable, lossy):
                digest = _digest(data)
                if self._unchanged(part, digest):
                    continue
                entry: Entry
                if len(data) > self.threshold or inline_bytes + len(data) > self.inline_budget:
                    key = self.key_prefix + digest
                    try:
                        self.object_store.put(key, data)
                    except Exception as exc:
                        log.warning(
                            "cannot store %s (%d bytes) as %r: %s", part, len(data), key, exc
                        )
                        for slot in part:
                            failed[slot] = f"object store: {type(exc).__name__}: {exc}"
                        not_synced.update(part)
                        continue
                    entry = {"slots": part, "h": digest, "ptr": key, "size": len(data)}
                    stored.extend(part)
                    stored_bytes += len(data)
                else:
                    entry = {"slots": part, "h": digest, "v": data}
                    inline_bytes += len(data)
                entries.append(entry)
                for slot in part:
                    shipped[slot] = digest
                    if notes:
                        lossy[slot] = notes
        not_synced |= unpicklable
        recompute = None
        recomputable: tuple[str, ...] = ()
        if lossy:
            entry_members = {e["h"]: e["slots"] for e in entries}
            decided = plan_recompute(
                source=source,
                ran=ran,
                opaque=effects.names is None,
                current=current.keys(),
                examined=reached.keys(),
                digests=self._component,
                shipped=shipped,
                members=lambda d: entry_members.get(d) or self._members.get(d) or (),
                not_copied=not_synced,
                deleted=deleted,
                incomplete=lossy.keys(),
                namespace=self.namespace,
                before=self.environment.encoded_state,
            )
            if decided.refused:
                log.debug("cell %d cannot be run again: %s", execution_count, decided.refused)
            recompute = decided.record
            recomputable = decided.targets if recompute is not None else ()

        # commit
        for slot in deleted:
            self._forget(slot)
            self._dropped.discard(slot)
        newly_dropped = sorted(not_synced - self._dropped)
        for slot in not_synced:
            self._forget(slot)
        self._dropped |= not_synced
        for entry in entries:
            self._members[entry["h"]] = frozenset(entry["slots"])
        for slot, digest in shipped.items():
            self._component[slot] = digest
            self._dropped.discard(slot)
        for slot, found in reached.items():
            if slot not in not_synced:
                self._index(slot, found)
        if not_synced:
            self._held = {s: v for s, v in current.items() if s not in not_synced}
        else:
            self._held = current  # built for this capture: nobody else holds it
        unpicklable_new = tuple(sorted(unpicklable - self._unpicklable))
        self._unpicklable = unpicklable
        self._prune_members()

        inputs = self.history.inputs(execution_count, source, raw)
        files = self.modules.changed_files()
        environment = self.environment.capture(raw if raw is not None else source, ran)
        payload: SyncPayload | None = None
        if (
            entries
            or deleted
            or newly_dropped
            or inputs
            or files
            or environment.interp
            or (environment.packages)
        ):
            payload = {
                "count": execution_count,
                "set": entries,
                "del": deleted,
                "unpicklable": newly_dropped,
                "source": source,
                "filename": filename,
                "inputs": inputs,
                "interp": environment.interp,
                "packages": environment.packages,
                "files": files,
            }
            if lossy:
                payload["lossy"] = sorted(s for s in lossy if s in shipped)
            if recompute is not None:
                payload["recompute"] = recompute
        seconds = time.perf_counter() - started
        log.debug(
            "capture %d: %d examined, %d entries (%d B inline, %d B stored), %d deleted, "
            "%d unpicklable in %.4f s",
            execution_count,
            len(reached),
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
            lossy=lossy,
            recomputable=recomputable,
            stored=tuple(stored),
            inline_bytes=inline_bytes,
            stored_bytes=stored_bytes,
            examined=len(reached),
            environment=environment,
            seconds=seconds,
        )

    def _widen(
        self, dirty: set[str], current: Mapping[str, object], everything: bool
    ) -> dict[str, frozenset[int]]:
        """Walk the dirty slots; add the slots named by code they reach and the slots sharing
        objects with them (identity index), until nothing new is added. slot -> ids reached.
        Slots holding the namespace itself are noted in ``self._holding_namespace``."""
        reached: dict[str, frozenset[int]] = {}
        self._holding_namespace = set()
        # ``_``, ``__``, ``___`` are outputs: they travel with the ``Out[N]`` holding the same
        # object (even a float), or IPython on the next executor would take them for names
        # the user bound and stop updating them.
        outputs = {id(v): s for s, v in self._outputs.items() if s in current}
        partners = {
            u: outputs[id(current[u])]
            for u in _UNDERSCORES
            if u in current and id(current[u]) in outputs
        }
        pending = set(dirty)
        pending |= {partners[u] for u in dirty & partners.keys()}
        while pending:
            found = reach({s: current[s] for s in pending}, self.namespace)
            more: set[str] = set()
            for slot, result in found.items():
                if result.truncated:
                    log.warning("%s reaches more than the walk limit: treated as shared", slot)
                    more |= set(current)
                reached[slot] = frozenset(result.ids)
                if result.holds_namespace:
                    self._holding_namespace.add(slot)
                if not everything:
                    more |= result.names & current.keys()
                for ident in result.ids:
                    more |= self._owners.get(ident, set())
            pending = {s for s in more if s in current and s not in reached}
            pending |= {
                partners[u] for u in pending & partners.keys() if partners[u] not in reached
            }
        for underscore, output in partners.items():
            if underscore in reached and output in reached:
                token = frozenset({id(current[underscore])})
                reached[underscore] |= token
                reached[output] |= token
        return reached

    def _pickle_component(
        self,
        slots: list[str],
        current: Mapping[str, object],
        unpicklable: set[str],
        lossy: dict[str, str],
    ) -> list[tuple[list[str], bytes, str]]:
        """Pickle a component whole; if that fails, each slot alone (reported as lossy: its
        sharing with the others is lost) and the slots that fail alone are unpicklable."""
        holding = [s for s in slots if s in self._holding_namespace]
        if holding:
            unpicklable.update(holding)
            slots = [s for s in slots if s not in holding]
            if not slots:
                return []
        values = _component_values(slots, current)
        try:
            pickled = dumps(
                (tuple(slots), values),
                self.namespace,
                self.travels_with_function,
                shared_arrays(values, self.namespace),
            )
            return [(slots, pickled.data, "; ".join(pickled.lossy))]
        except Exception as exc:
            if len(slots) == 1:
                log.debug("cannot pickle %s: %s: %s", slots[0], type(exc).__name__, exc)
                unpicklable.add(slots[0])
                return []
        parts: list[tuple[list[str], bytes, str]] = []
        for slot in slots:
            parts.extend(self._pickle_component([slot], current, unpicklable, lossy))
        separated = [p[0][0] for p in parts]
        if len(separated) > 1:
            for slot in separated:
                lossy[slot] = (
                    "its sharing of objects with "
                    + ", ".join(s for s in slots if s != slot)
                    + " (some of them cannot be copied, so it is copied on its own)"
                )
        return parts

    def _unchanged(self, slots: list[str], digest: str) -> bool:
        shipped = self._component.get(slots[0])
        if shipped is None or (digest != shipped and self._local.get(shipped) != digest):
            return False
        return self._members.get(shipped) == frozenset(slots) and all(
            self._component.get(s) == shipped for s in slots
        )

    # -- follower side ----------------------------------------------------------------------

    def apply(self, payload: Mapping[str, Any]) -> ApplyResult:
        """Apply a payload captured on another replica (raises ``ValueError`` if malformed).

        Entries this replica already holds (same digest) are not reloaded, so applying a
        replica's own payload is harmless. An entry that cannot be fetched, fails its digest
        or cannot be unpickled here is logged, reported in ``failed`` and its slots' old
        values removed; the rest is applied.
        """
        started = time.perf_counter()
        checked = validate_payload(payload)
        self.history.register_source(checked["filename"], checked["source"], checked["count"])
        # The working directory and sys.path first: files and values may depend on them.
        self.environment.apply(checked["interp"], checked["packages"])
        self.modules.write_files(checked["files"])
        failed: dict[str, str] = {}
        deleted: list[str] = []
        dropped: list[str] = []
        loaded: list[str] = []

        def allowed(slot: str) -> bool:
            if output_number(slot) is None and slot[0] not in "@%!" and not self.is_synced(slot):
                failed[slot] = "not a synchronised name (IPython machinery)"
                log.warning("sync payload %d: ignored %r", checked["count"], slot)
                return False
            return True

        for slot in filter(allowed, checked["del"]):
            if self._remove(slot):
                deleted.append(slot)
            self._forget(slot)
            self._dropped.discard(slot)
        for slot in filter(allowed, checked["unpicklable"]):
            if slot in self._dropped:
                continue  # already dropped (or this replica's own payload)
            if self._remove(slot):
                dropped.append(slot)
            self._forget(slot)
            self._dropped.add(slot)

        for entry in checked["set"]:
            live = [s for s in entry.get("live", entry["slots"]) if allowed(s)]
            digest = entry["h"]
            if all(self._component.get(s) == digest and s in self._held for s in live):
                continue
            _close_figures(self.namespace.get(s) for s in live)
            try:
                values = self._load(entry)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("sync payload %d: cannot load %s: %s", checked["count"], live, reason)
                for slot in live:
                    failed[slot] = reason
                    self._remove(slot)
                    self._forget(slot)
                    # Keep the digest: if this replica executes next, its payload deletes the
                    # slot on the others, so that every replica agrees with the executor.
                    self._component[slot] = digest
                continue
            self._members[digest] = frozenset(entry["slots"])
            if "v" in entry and len(live) == len(entry["slots"]):
                self._note_local_digest(entry, values)
            for slot in live:
                value = values[slot]
                self._assign(slot, value)
                self._forget(slot)
                self._component[slot] = digest
                self._held[slot] = value
                self._dropped.discard(slot)
                loaded.append(slot)
        self.history.apply_inputs(checked["inputs"])
        self._rebuilds.note(checked, loaded, [*deleted, *dropped, *failed], self._component)

        if checked.get("full"):
            keep = {s for e in checked["set"] for s in e.get("live", e["slots"])}
            keep |= set(checked["unpicklable"])
            for slot in [s for s in self._current() if s not in keep]:
                self._remove(slot)
                self._forget(slot)
                deleted.append(slot)
            for slot in (self._component.keys() | self._dropped) - keep:
                self._forget(slot)
                self._dropped.discard(slot)
        self._reindex(loaded)
        self._prune_members()
        return ApplyResult(
            count=checked["count"],
            loaded=tuple(sorted(loaded)),
            deleted=tuple(sorted(deleted)),
            dropped=tuple(sorted(dropped)),
            failed=failed,
            seconds=time.perf_counter() - started,
        )

    def rebuild_incomplete(self) -> list[str]:
        """Called by the kernel just before a cell runs on this replica (before the
        interpreter state is restored): run again the cells that can rebuild this replica's
        incomplete copies (``_recompute``). Returns warnings for the user. Only the replica
        that executes pays for this; the others keep the plans."""

        def same(old: object, new: object) -> bool:
            return same_value(old, new, self.dumps)

        def rebuilt(values: dict[str, object], layouts: Layouts) -> None:
            self._held.update(values)
            self._reindex(list(values))
            # A rebuilt value pickles differently (tensors name storage addresses): known
            # here as the value of the entry the executor shipped.
            for digest, slots in layouts:
                if all(s in values for s in slots):
                    self._note_local_digest({"slots": list(slots), "h": digest}, values)

        return self._rebuilds.run(
            self.namespace, self._component, self.environment.state_before, same, rebuilt
        )

    def _load(self, entry: Entry) -> dict[str, object]:
        if "v" in entry:
            data = entry["v"]
        else:
            data = self.object_store.get(entry["ptr"])
            if len(data) != entry["size"]:
                raise ValueError(
                    f"object {entry['ptr']!r} has {len(data)} bytes, expected {entry['size']}"
                )
        if _digest(data) != entry["h"]:
            raise ValueError("hash mismatch: the pickled bytes are not the ones announced")
        slots, values = loads(data, self.namespace)
        if list(slots) != list(entry["slots"]) or len(values) != len(slots):
            raise ValueError("the pickle does not hold the slots its entry names")
        loaded = dict(zip(slots, values, strict=True))
        for slot, value in loaded.items():
            if isinstance(value, SameAs):
                loaded[slot] = loaded[value.slot]
        return loaded

    def _note_local_digest(self, entry: Entry, values: Mapping[str, object]) -> None:
        """This process may pickle what it just loaded differently from the executor (string
        interning, set order); remember its own digest as meaning the same values, so that a
        capture here after a failover does not ship them again. Inline entries only: large
        values (arrays) pickle the same everywhere and are costly to pickle again."""
        slots = entry["slots"]
        loaded = _component_values(slots, values)
        try:
            pickled = dumps(
                (tuple(slots), loaded),
                self.namespace,
                self.travels_with_function,
                shared_arrays(loaded, self.namespace),
            )
        except Exception:
            return
        local = _digest(pickled.data)
        if local != entry["h"]:
            self._local[entry["h"]] = local

    def _assign(self, slot: str, value: object) -> None:
        number = output_number(slot)
        if number is not None:
            self.history.set_output(number, value)
        elif slot[0] in "%!":
            self.history.assign_shell_slot(slot, value)
        elif slot[0] == "@":
            self.modules.assign(slot, value)
        else:
            self.namespace[slot] = value
            if slot in _UNDERSCORES:
                self.history.note_underscore(slot, value, self.hidden)

    def _remove(self, slot: str) -> bool:
        number = output_number(slot)
        if number is not None:
            return self.history.remove_output(number)
        if slot[0] in "%!":
            return self.history.remove_shell_slot(slot)
        if slot[0] == "@":
            return self.modules.remove(slot)
        return self.namespace.pop(slot, _MISSING) is not _MISSING

    def _reindex(self, slots: list[str]) -> None:
        """Walk what was just loaded, so that this replica knows its sharing if it executes
        next."""
        if not slots:
            return
        found = reach({s: self._held[s] for s in slots if s in self._held}, self.namespace)
        for slot, result in found.items():
            self._index(slot, frozenset(result.ids))

    # -- helpers ----------------------------------------------------------------------------

    def _index(self, slot: str, ids: frozenset[int]) -> None:
        old = self._reach.get(slot, frozenset())
        for ident in old - ids:
            owners = self._owners.get(ident)
            if owners is not None:
                owners.discard(slot)
                if not owners:
                    del self._owners[ident]
        for ident in ids - old:
            self._owners.setdefault(ident, set()).add(slot)
        self._reach[slot] = ids

    def _forget(self, slot: str) -> None:
        self._component.pop(slot, None)
        self._held.pop(slot, None)
        self._index(slot, frozenset())
        self._reach.pop(slot, None)

    def _prune_members(self) -> None:
        live = set(self._component.values())
        for digest in [d for d in self._members if d not in live]:
            del self._members[digest]
        for digest in [d for d in self._local if d not in live]:
            del self._local[digest]
