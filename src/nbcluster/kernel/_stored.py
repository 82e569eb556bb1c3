"""A kernel's state in the object store, written by its executor and read back when the kernel
lost every replica: checkpoints (two generations) and the log tail, and what happens when
an object is refused. The store given is the replica's sealed one (``_sealed.SealedStore``),
so every object read here was authenticated, or raised, before it is decoded; the layout and
the rebuilding itself are ``_checkpoint``'s.

What a restore uses, and what it does with a refused object (forged, altered, unsigned, or
failing the store's checksum), each refusal logged and named in the result (a store that
cannot be read at all fails the restore, as before):

* the newest checkpoint that opens; a refused one is passed over for the one before it
  (kept for that, and checked to open when the newer one was written: the log entries after
  it are still in the store, so nothing is lost);
* when checkpoints exist but none opens, nothing: :class:`NoAuthenticState` (the log tail
  alone would rebuild only the cells after a checkpoint, a state the kernel never had);
* every log entry after the chosen checkpoint that opens, in term order; a refused entry is
  left out (its cell's changes are missing; the entries of other cells are authentic and
  are applied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..store import ObjectCorruptedError, ObjectNotFoundError, ObjectStore
from ._checkpoint import (
    Checkpoint,
    checkpoint_key,
    checkpoint_prefix,
    decode_checkpoint,
    legacy_checkpoint_key,
    log_prefix,
    term_of_key,
)
from ._seal import ForgedState

__all__ = ["NoAuthenticState", "StoredState", "read_state", "write_checkpoint"]

log = logging.getLogger(__name__)


class NoAuthenticState(RuntimeError):
    """The store holds state of the kernel but nothing to restore it from (no checkpoint that
    opens, or no object at all that opens). The text names each refused object and why."""


@dataclass
class StoredState:
    """What a restore starts from."""

    checkpoint: Checkpoint | None = None
    #: The authentic log entries after the checkpoint (undecoded ``Done`` records).
    entries: list[bytes] = field(default_factory=list)
    #: Keys of the objects refused or unreadable, and why (one line each).
    refused: dict[str, str] = field(default_factory=dict)


def write_checkpoint(store: ObjectStore, kernel_id: str, term: int, data: bytes) -> None:
    """Store the checkpoint of ``term``, then drop what it makes unnecessary: every checkpoint
    but it and its fallback (the newest earlier one that opens: it is read back to make sure,
    so that a refused one is never what a restore would fall back on), the old unsigned one,
    and the log entries up to the fallback's term (those after it are what falling back to it
    needs). A checkpoint of a later term is not this kernel's history (one a restore passed
    over): it goes too."""
    store.put(checkpoint_key(kernel_id, term), data)
    stored: dict[int, str] = {}
    for info in list(store.list(checkpoint_prefix(kernel_id))):
        found = term_of_key(info.key)
        if found is not None:
            stored[found] = info.key
    fallback: int | None = None
    for older in sorted((t for t in stored if t < term), reverse=True):
        try:
            store.get(stored[older])
        except (ForgedState, ObjectCorruptedError, ObjectNotFoundError):
            continue  # refused (the sealed store logged it), damaged or gone: not a fallback
        fallback = older
        break
    for found, key in stored.items():
        if found not in (term, fallback):
            store.delete(key)
    store.delete(legacy_checkpoint_key(kernel_id))
    if fallback is None:
        return  # nothing earlier to fall back on: the whole log stays the fallback
    for info in list(store.list(log_prefix(kernel_id))):
        covered = term_of_key(info.key)
        if covered is not None and covered <= fallback:
            store.delete(info.key)


def _read(store: ObjectStore, key: str, refused: dict[str, str]) -> bytes | None:
    """The object under ``key`` if it opens; None (noted in ``refused``) if it is refused or
    unreadable, None (not noted) if it is gone."""
    try:
        return store.get(key)
    except ObjectNotFoundError:
        return None
    except ForgedState as exc:  # the sealed store has logged and counted it
        refused[key] = exc.reason
    except ObjectCorruptedError as exc:
        # Damaged, not forged: as unusable. (Other store errors, an unreachable store, are
        # not the object's fault: they fail the restore with the store's message.)
        log.warning("cannot use %s for a restore: %s", key, exc)
        refused[key] = str(exc)
    return None


def read_state(store: ObjectStore, kernel_id: str) -> StoredState:
    """The newest authentic checkpoint and the authentic log entries after it (see the module
    docstring). Raises :class:`NoAuthenticState` when checkpoints exist and none opens."""
    state = StoredState()
    legacy = legacy_checkpoint_key(kernel_id)
    terms: list[tuple[int, str]] = []
    seen_legacy = False
    # One listing finds both layouts ("kernels/K/checkpoint" is a prefix of the new one).
    for info in list(store.list(legacy)):
        if info.key == legacy:
            seen_legacy = True
        elif (term := term_of_key(info.key)) is not None and info.key.startswith(
            checkpoint_prefix(kernel_id)
        ):
            terms.append((term, info.key))
    for _term, key in sorted(terms, reverse=True):
        data = _read(store, key, state.refused)
        if data is None:
            continue
        try:
            state.checkpoint = decode_checkpoint(data)
        except ValueError as exc:
            log.error("cannot decode %s: %s", key, exc)
            state.refused[key] = str(exc)
            continue
        break
    if seen_legacy and state.checkpoint is None:
        _read(store, legacy, state.refused)  # refused: it is unsigned (logged as such)
    if state.checkpoint is None and state.refused:
        raise NoAuthenticState(
            "no checkpoint of this kernel in the object store is authentic: "
            + "; ".join(f"{key}: {why}" for key, why in state.refused.items())
        )
    after = state.checkpoint.term if state.checkpoint is not None else 0
    for info in list(store.list(log_prefix(kernel_id))):
        term = term_of_key(info.key)
        if term is None or term <= after:
            continue
        data = _read(store, info.key, state.refused)
        if data is not None:
            state.entries.append(data)
    return state
