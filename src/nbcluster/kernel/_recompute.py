"""Rebuilding what could not be copied by running its cell again (ElasticNotebook's
recomputation), on the replica that takes over.

Some values arrive incomplete: an autograd graph (``loss`` arrives as a leaf without
``grad_fn``), a traceback, the sharing of objects with a value that cannot be copied. When the cell that made
them can be run again with the same result, the executor says so in its payload (``plan``);
every other replica keeps that plan while its copies are incomplete (``Pending``), and the one
that executes next runs the cell again before its first cell (``rerun``), so ``loss.backward()``
works after a failover.

A cell may be run again only when all of this holds (checked on the executor, ``plan``):

* it ran to its end, and its source names every global it can reach (no ``globals()``,
  ``exec``, magics or shell escapes: ``_touched``);
* everything it changed is a name it binds: it mutated nothing it did not bind (an object it
  read and changed in place would be changed twice);
* it reads no name before binding it that existed before the cell (``x = x + 1``), and every
  global it reads (``_cell_reads.free_reads``, plus the globals of the notebook code it
  reaches) is copied whole: its digest is recorded;
* nothing in it, or in the notebook functions and classes it uses, acts outside the namespace
  or reads the outside world (``_cell_reads.side_effect``).

And when the replica that takes over runs it (``rerun``): every name it read and every name it
bound still has the digest recorded (no later cell changed them), no name it read is itself an
incomplete copy, it runs with the interpreter state the executor had before it (random
generators, ``decimal`` context, working directory ...: the plan carries it), and every value
it binds comes out equal (pickled the same way) to the copy this replica holds. Otherwise the
names it bound keep their incomplete copies and the user is told.

Not carried by snapshots and checkpoints: a replica restored from one keeps incomplete copies.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ._cell_reads import free_reads, side_effect
from ._payload import RecomputeRecord, SyncPayload, output_number
from ._touched import bound_names

__all__ = ["Layouts", "Pending", "Plan", "Rebuilds", "Rerun", "plan", "rerun", "same_value"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``plan`` decided: a record to ship, or why not (for the log)."""

    record: RecomputeRecord | None
    #: the names the record can rebuild (incomplete or not copied)
    targets: tuple[str, ...] = ()
    refused: str = ""


def _history_slot(slot: str) -> bool:
    """``Out[N]`` and ``_``/``__``/``___``: IPython's outputs, not names a cell binds."""
    return output_number(slot) is not None or slot in ("_", "__", "___")


def _module(namespace: Mapping[str, object], slot: str) -> bool:
    """Modules are left out of the plan: one is the same object wherever it is imported, and
    its entry changes whenever it gains a loaded submodule (``_pickling``)."""
    return isinstance(namespace.get(slot), types.ModuleType)


def plan(
    *,
    source: str,
    ran: bool,
    opaque: bool,
    current: Collection[str],
    examined: Collection[str],
    digests: Mapping[str, str],
    shipped: Mapping[str, str],
    members: Callable[[str], Collection[str]],
    not_copied: Collection[str],
    deleted: Collection[str],
    incomplete: Collection[str],
    namespace: Mapping[str, object],
    before: Callable[[], bytes],
) -> Plan:
    """Called by the executor's capture once it knows what the cell changed: whether (and
    how) the cell can be run again elsewhere to rebuild ``incomplete`` and ``not_copied``
    names. ``digests``: slot -> digest before this cell; ``shipped``: slot -> digest of its
    new entry; ``members``: digest -> the slots of its entry; ``examined``: the slots the capture walked (the globals of code the cell
    reaches among them); ``before``: the encoded interpreter state before the cell."""
    binds = set(bound_names(source))
    targets = tuple(sorted(set(incomplete) & binds))
    if not targets:
        return Plan(None)
    if binds & set(not_copied):
        # A value with no digest: nothing would tell a later change of it from none.
        return Plan(None, targets, "the cell binds names that cannot be copied at all")
    if not ran:
        return Plan(None, targets, "the cell did not run to its end")
    if opaque:
        return Plan(None, targets, "the cell can reach globals it does not name")
    if binds & set(deleted):
        return Plan(None, targets, "the cell deletes names")
    changed = (set(shipped) | set(not_copied) | set(deleted)) - binds
    changed = {s for s in changed if not _history_slot(s) and not _module(namespace, s)}
    if changed:
        return Plan(None, targets, f"the cell also changed {', '.join(sorted(changed))}")
    reads = free_reads(source)
    if reads is None:
        return Plan(None, targets, "the cell does not parse")
    early = sorted(r for r in reads & binds if r in digests)
    if early:
        return Plan(None, targets, f"the cell reads {', '.join(early)} before binding it")
    read_slots = {
        s
        for s in {r for r in reads if r in current} | set(examined)
        if s not in binds and not _history_slot(s) and not _module(namespace, s)
    }
    uncopied = sorted(s for s in read_slots if s not in digests)
    if uncopied:
        return Plan(None, targets, f"the cell reads {', '.join(uncopied)}, not copied")
    effect = side_effect(source, namespace)
    if effect is not None:
        return Plan(None, targets, f"the cell may act outside the namespace: {effect}")
    bind_digests = {
        b: shipped.get(b, digests.get(b, ""))
        for b in sorted(binds)
        if b in current and not _module(namespace, b)
    }
    for name, digest in bind_digests.items():
        others = sorted(set(members(digest)) - binds)
        if others:
            # Rebuilt, it would no longer share objects with them.
            return Plan(None, targets, f"{name} shares objects with {', '.join(others)}")
    record: RecomputeRecord = {
        "binds": bind_digests,
        "reads": {s: digests[s] for s in sorted(read_slots)},
        "before": before(),
    }
    return Plan(record, targets)


#: (entry digest, its slots in pickle order), for each entry a rebuilt cell's values came in
Layouts = tuple[tuple[str, tuple[str, ...]], ...]

#: At most this many cells kept to rebuild incomplete copies (the oldest go first).
PENDING_LIMIT = 64


@dataclass(slots=True)
class Pending:
    """A plan kept by a replica whose copies of its targets are incomplete."""

    count: int
    source: str
    filename: str
    record: RecomputeRecord
    targets: tuple[str, ...]
    #: (digest, slots in pickle order) of the entries that carried what the cell bound: a
    #: rebuilt value pickles differently (tensors name storage addresses), and the replica
    #: must still know it as the value of that entry
    layouts: Layouts = ()

    def valid(self, digests: Mapping[str, str]) -> bool:
        """Whether no later cell changed what the cell read or bound (``digests``: this
        replica's slot -> entry digest)."""
        for slot, digest in self.record["reads"].items():
            if digests.get(slot) != digest:
                return False
        return all(digests.get(s) == d for s, d in self.record["binds"].items())


class Rerun(Exception):
    """A cell could not be run again to the same result (the message says why)."""


_MISSING: Any = object()


def rerun(
    pending: Pending,
    namespace: dict[str, Any],
    state_before: Callable[[bytes], contextlib.AbstractContextManager[None]],
    same: Callable[[object, object], bool],
) -> dict[str, object]:
    """Run a pending cell again in ``namespace`` with the interpreter state it had before
    (``state_before``), its output discarded; return the values it bound. ``same(old, new)``
    says whether a rebuilt value equals the copy held here. Raises :class:`Rerun` (with the
    namespace as it was) if the cell fails or a value comes out different."""
    binds = pending.record["binds"]
    backup = {name: namespace.get(name, _MISSING) for name in binds}

    def restore() -> None:
        for name, value in backup.items():
            if value is _MISSING:
                namespace.pop(name, None)
            else:
                namespace[name] = value

    sink = io.StringIO()
    try:
        code = compile(pending.source, pending.filename or "<recompute>", "exec")
        with (
            state_before(pending.record["before"]),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            exec(code, namespace)
    except BaseException as exc:
        restore()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise Rerun(f"running it again raised {type(exc).__name__}: {exc}") from exc
    rebuilt: dict[str, object] = {}
    for name in binds:
        value = namespace.get(name, _MISSING)
        if value is _MISSING:
            restore()
            raise Rerun(f"running it again did not bind {name}")
        old = backup[name]
        if old is not _MISSING and not same(old, value):
            restore()
            raise Rerun(f"running it again gave another value for {name}")
        rebuilt[name] = value
    return rebuilt


def same_value(old: object, new: object, dumps: Callable[[object], bytes]) -> bool:
    """Whether a rebuilt value equals the copy held here: tensors and arrays by contents
    (their pickles name storage addresses), anything else by its pickle (the way it was
    copied), else by ``==``. False when unsure."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(old, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            return False
        # (.grad of a non-leaf tensor warns, and is never set)
        old_grad = old.grad if old.is_leaf else None
        new_grad = new.grad if new.is_leaf else None
        return (
            type(old) is type(new)
            and old.dtype == new.dtype
            and old.shape == new.shape
            and old.requires_grad == new.requires_grad
            and bool(torch.equal(old.detach(), new.detach()))
            and (old_grad is None) == (new_grad is None)
            and (old_grad is None or bool(torch.equal(old_grad, new_grad)))
        )
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(old, numpy.ndarray):
        return (
            isinstance(new, numpy.ndarray)
            and old.dtype == new.dtype
            and old.shape == new.shape
            and bool(numpy.array_equal(old, new, equal_nan=old.dtype.kind in "fc"))
        )
    with contextlib.suppress(Exception):
        if dumps(old) == dumps(new):
            return True
    try:
        return bool(old == new)
    except Exception:
        return False


class Rebuilds:
    """A replica's incomplete copies and the cells that can rebuild them: fed by the
    synchroniser with each applied payload (``note``), run by the replica that executes next
    (``run``)."""

    def __init__(self) -> None:
        #: slots whose copies here are incomplete (an autograd graph left out ...)
        self.incomplete: set[str] = set()
        #: cells that can rebuild them, oldest first
        self.pending: list[Pending] = []

    def note(
        self,
        payload: SyncPayload,
        loaded: Collection[str],
        gone: Collection[str],
        digests: Mapping[str, str],
    ) -> None:
        """After a payload was applied here: which copies are incomplete now, and whether
        the payload's cell can rebuild some. ``loaded``: slots loaded from it; ``gone``:
        slots it deleted or dropped; ``digests``: this replica's slot -> entry digest."""
        lossy = set(payload.get("lossy", ()))
        for slot in loaded:
            if slot in lossy:
                self.incomplete.add(slot)
            else:
                self.incomplete.discard(slot)
        self.incomplete.difference_update(gone)
        record = payload.get("recompute")
        if record is not None:
            targets = tuple(s for s in sorted(lossy & self.incomplete) if s in record["binds"])
            if targets:
                binds = record["binds"].keys()
                layouts = tuple(
                    (e["h"], tuple(e["slots"]))
                    for e in payload["set"]
                    if not binds.isdisjoint(e["slots"])
                )
                self.pending.append(
                    Pending(
                        payload["count"],
                        payload["source"],
                        payload["filename"],
                        record,
                        targets,
                        layouts,
                    )
                )
        live = [p for p in self.pending if p.valid(digests)]
        self.pending = live[-PENDING_LIMIT:]

    def run(
        self,
        namespace: dict[str, Any],
        digests: Mapping[str, str],
        state_before: Callable[[bytes], contextlib.AbstractContextManager[None]],
        same: Callable[[object, object], bool],
        rebuilt: Callable[[dict[str, object], Layouts], None],
    ) -> list[str]:
        """Run the pending cells that can still rebuild copies here, in order (see
        :func:`rerun`); ``rebuilt(values, layouts)`` is told what each one rebuilt. Returns
        warnings for the user; nothing stays pending."""
        pending, self.pending = self.pending, []
        notices: list[str] = []
        for cell in pending:
            targets = [t for t in cell.targets if t in self.incomplete]
            if not targets or not cell.valid(digests):
                continue
            names = ", ".join(targets)
            inputs = sorted(set(cell.record["reads"]) & self.incomplete)
            if inputs:
                notices.append(
                    f"[nbcluster] cannot rebuild by running cell [{cell.count}] again: it "
                    f"reads {', '.join(inputs)}, whose copies are incomplete too; these keep "
                    f"incomplete copies: {names}\n"
                )
                continue
            try:
                values = rerun(cell, namespace, state_before, same)
            except Rerun as exc:
                notices.append(
                    f"[nbcluster] could not rebuild by running cell [{cell.count}] again "
                    f"({exc}); these keep incomplete copies: {names}\n"
                )
                continue
            self.incomplete.difference_update(values)
            rebuilt(values, cell.layouts)
            notices.append(
                f"[nbcluster] rebuilt on this replica by running cell [{cell.count}] again "
                f"(they could not be copied whole): {names}\n"
            )
        return notices
