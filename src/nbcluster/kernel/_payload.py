"""The state update of one cell as it travels in the replicated log, and the merged state that
snapshots and checkpoints hold. Pure data and validation; no pickles are opened here.

Written by :class:`~._sync.StateSynchronizer` on the executor, validated by every replica
before anything is applied, merged by :class:`~._replication.ReplicaCoordinator` (snapshots)
and by :func:`~._checkpoint.rebuild` (checkpoints). Everything is msgpack primitives::

    {
        "count": 7,                        # the cell's execution count
        "set": [                           # components: names that share objects, one pickle
            {"slots": ["a", "b"], "h": "<32 hex>", "v": b"<pickle of (a, b)>"},
            {"slots": ["df"], "h": "<32 hex>", "ptr": "<store key>", "size": 123},
        ],
        "del": ["old"],                    # slots deleted since the last update
        "unpicklable": ["f"],              # slots that could not be copied: others drop them
        "source": "...", "filename": "...", # the cell, for linecache on the others
        "inputs": [[7, "x = 1", "x = 1"]],  # IPython history: raw and transformed input
        "interp": {"cwd": b"..."},          # interpreter state that changed (``_interpreter``)
        "packages": [...],                  # package installs to replay (``_packages``)
        "files": [{"path": "mod.py", "h": "...", "v": b"..."}],  # user modules' sources
        "full": True,                       # optional: a snapshot: nothing else survives
        "lossy": ["loss"],                  # optional: slots whose copies are incomplete
        "recompute": {"binds": {...}, "reads": {...}, "before": b"..."},  # optional, _recompute
        "told": ["widgets"],                # optional: warnings the user was given (once a kernel)
    }

A *slot* is where a value lives: a user global (``x``, ``_private``), an IPython output
(``Out[3]``, which also sets ``_3``, ``_``, ``__`` and ``___``), or an attribute of a module
(``@json:my_flag``, ``@pandas:DataFrame.plot_nice``), a magic the notebook defined
(``%line:shout``) or its callbacks for a shell event (``!event:post_run_cell``). In a full payload an entry may carry
``live``: the slots of its pickle still current (the others were overwritten by later
entries).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import msgpack

__all__ = [
    "Entry",
    "FileEntry",
    "MergedState",
    "RecomputeRecord",
    "SyncPayload",
    "decode_payload",
    "encode_payload",
    "validate_payload",
    "validate_slot",
]

_HEX128 = re.compile(r"[0-9a-f]{32}")
_OUTPUT_SLOT = re.compile(r"Out\[(\d{1,18})\]")
_MODULE_SLOT = re.compile(r"@([A-Za-z_][\w.]*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_SHELL_SLOT = re.compile(r"%(line|cell):([A-Za-z_]\w*)|!event:([A-Za-z_]\w*)")
_MAX_COUNT = 2**63 - 1


class Entry(TypedDict):
    slots: list[str]
    h: str
    v: NotRequired[bytes]
    ptr: NotRequired[str]
    size: NotRequired[int]
    live: NotRequired[list[str]]


class RecomputeRecord(TypedDict):
    """A cell that can be run again to rebuild incomplete copies (``_recompute``)."""

    #: every global the cell bound -> digest of the entry carrying it
    binds: dict[str, str]
    #: every global the cell read -> digest of the entry carrying it
    reads: dict[str, str]
    #: the interpreter state before the cell (``_interpreter.encode_state``)
    before: bytes


class FileEntry(TypedDict):
    path: str
    h: str
    v: bytes


SyncPayload = TypedDict(
    "SyncPayload",
    {
        "count": int,
        "set": list[Entry],
        "del": list[str],
        "unpicklable": list[str],
        "source": str,
        "filename": str,
        "inputs": list[list[Any]],
        "interp": dict[str, bytes],
        "packages": list[Any],
        "files": list[FileEntry],
        "full": NotRequired[bool],
        "lossy": NotRequired[list[str]],
        "recompute": NotRequired[RecomputeRecord],
        "told": NotRequired[list[str]],
    },
)

_REQUIRED = ("count", "set", "del")
_OPTIONAL = (
    "unpicklable",
    "source",
    "filename",
    "inputs",
    "interp",
    "packages",
    "files",
    "full",
    "lossy",
    "recompute",
    "told",
)


def _fail(problem: str) -> ValueError:
    return ValueError(f"malformed sync payload: {problem}")


def validate_slot(slot: object, where: str) -> str:
    """A slot name (see the module docstring), or ``ValueError`` naming the problem."""
    if not isinstance(slot, str) or not slot:
        raise _fail(f"{where} must be a non-empty str, got {slot!r:.80}")
    if (
        slot.isidentifier()
        or _OUTPUT_SLOT.fullmatch(slot)
        or _MODULE_SLOT.fullmatch(slot)
        or _SHELL_SLOT.fullmatch(slot)
    ):
        return slot
    raise _fail(
        f"{where}: {slot!r:.80} is not a name, Out[N], @module:attribute, %kind:magic "
        "or !event:name"
    )


def output_number(slot: str) -> int | None:
    """N for ``Out[N]``, else None."""
    match = _OUTPUT_SLOT.fullmatch(slot)
    return int(match.group(1)) if match else None


def module_slot(slot: str) -> tuple[str, tuple[str, ...]] | None:
    """(module, attribute path) for ``@module:a.b``, else None."""
    match = _MODULE_SLOT.fullmatch(slot)
    return (match.group(1), tuple(match.group(2).split("."))) if match else None


def _slots(value: object, where: str) -> list[str]:
    if not isinstance(value, list | tuple):
        raise _fail(f"{where!r} must be a list of slots, got {type(value).__name__}")
    seen: set[str] = set()
    for i, slot in enumerate(value):
        validate_slot(slot, f"{where}[{i}]")
        if slot in seen:
            raise _fail(f"{where!r} lists {slot!r} twice")
        seen.add(slot)
    return list(value)


def _digest_field(entry: Mapping[str, Any], where: str) -> str:
    digest = entry.get("h")
    if not isinstance(digest, str) or not _HEX128.fullmatch(digest):
        raise _fail(f"{where}: 'h' must be 32 lowercase hex digits, got {digest!r:.80}")
    return digest


def _entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, Mapping):
        raise _fail(f"{where} must be a map, got {type(raw).__name__}")
    digest = _digest_field(raw, where)
    slots = _slots(raw.get("slots"), f"{where}.slots")
    if not slots:
        raise _fail(f"{where}.slots is empty")
    keys = set(raw) - {"live"}
    entry: Entry
    if keys == {"slots", "h", "v"}:
        data = raw["v"]
        if not isinstance(data, bytes):
            raise _fail(f"{where}: 'v' must be bytes, got {type(data).__name__}")
        entry = {"slots": slots, "h": digest, "v": data}
    elif keys == {"slots", "h", "ptr", "size"}:
        ptr, size = raw["ptr"], raw["size"]
        if not isinstance(ptr, str) or not ptr:
            raise _fail(f"{where}: 'ptr' must be a non-empty str, got {ptr!r:.80}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(f"{where}: 'size' must be an int >= 0, got {size!r:.80}")
        entry = {"slots": slots, "h": digest, "ptr": ptr, "size": size}
    else:
        raise _fail(
            f"{where} must have slots, h and v (inline) or slots, h, ptr and size (pointer); "
            f"it has {sorted(map(str, raw))}"
        )
    if "live" in raw:
        live = _slots(raw["live"], f"{where}.live")
        if not set(live) <= set(slots):
            raise _fail(f"{where}.live names slots that are not in its pickle")
        entry["live"] = live
    return entry


def _files(raw: object) -> list[FileEntry]:
    if not isinstance(raw, list | tuple):
        raise _fail(f"'files' must be a list, got {type(raw).__name__}")
    files: list[FileEntry] = []
    for i, item in enumerate(raw):
        where = f"files[{i}]"
        if not isinstance(item, Mapping) or set(item) != {"path", "h", "v"}:
            raise _fail(f"{where} must be a map with path, h and v")
        path, data = item["path"], item["v"]
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise _fail(f"{where}: 'path' must be a relative path inside the working directory")
        if not isinstance(data, bytes):
            raise _fail(f"{where}: 'v' must be bytes")
        files.append({"path": path, "h": _digest_field(item, where), "v": data})
    return files


def _inputs(raw: object) -> list[list[Any]]:
    if not isinstance(raw, list | tuple):
        raise _fail(f"'inputs' must be a list, got {type(raw).__name__}")
    inputs: list[list[Any]] = []
    for i, item in enumerate(raw):
        if (
            not isinstance(item, list | tuple)
            or len(item) not in (2, 3)
            or not isinstance(item[0], int)
            or isinstance(item[0], bool)
            or not 0 < item[0] <= _MAX_COUNT
            or not all(isinstance(text, str) for text in item[1:])
        ):
            raise _fail(
                f"inputs[{i}] must be [execution count >= 1, raw source, transformed source]"
            )
        inputs.append(list(item))
    return inputs


def _interp(raw: object) -> dict[str, bytes]:
    if not isinstance(raw, Mapping):
        raise _fail(f"'interp' must be a map, got {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise _fail("'interp' must map probe names (str) to bytes")
    return dict(raw)


def _digests(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise _fail(f"{where!r} must be a map, got {type(raw).__name__}")
    for slot, digest in raw.items():
        validate_slot(slot, where)
        if not isinstance(digest, str) or not _HEX128.fullmatch(digest):
            raise _fail(f"{where!r}: {slot!r} must map to a 32-hex digest, got {digest!r:.80}")
    return dict(raw)


def _recompute(raw: object) -> RecomputeRecord:
    if not isinstance(raw, Mapping) or set(raw) != {"binds", "reads", "before"}:
        raise _fail("'recompute' must be a map of 'binds', 'reads' and 'before'")
    if not isinstance(raw["before"], bytes):
        raise _fail("'recompute.before' must be bytes")
    return {
        "binds": _digests(raw["binds"], "recompute.binds"),
        "reads": _digests(raw["reads"], "recompute.reads"),
        "before": raw["before"],
    }


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
    raw_entries = payload["set"]
    if not isinstance(raw_entries, list | tuple):
        raise _fail(f"'set' must be a list of entries, got {type(raw_entries).__name__}")
    entries = [_entry(raw, f"set[{i}]") for i, raw in enumerate(raw_entries)]
    deleted = _slots(payload["del"], "del")
    unpicklable = _slots(payload.get("unpicklable", []), "unpicklable")
    if not payload.get("full"):
        shipped: set[str] = set()
        for i, entry in enumerate(entries):
            if shipped & set(entry["slots"]):
                raise _fail(f"set[{i}] ships a slot that an earlier entry ships too")
            shipped |= set(entry["slots"])
        for slot in deleted:
            if slot in shipped:
                raise _fail(f"{slot!r} is both in 'set' and in 'del'")
        for slot in unpicklable:
            if slot in shipped or slot in deleted:
                raise _fail(f"{slot!r} is in 'unpicklable' and in 'set' or 'del'")
    source = payload.get("source", "")
    filename = payload.get("filename", "")
    if not isinstance(source, str):
        raise _fail(f"'source' must be a str, got {type(source).__name__}")
    if not isinstance(filename, str):
        raise _fail(f"'filename' must be a str, got {type(filename).__name__}")
    packages = payload.get("packages", [])
    if not isinstance(packages, list | tuple):
        raise _fail(f"'packages' must be a list, got {type(packages).__name__}")
    result: SyncPayload = {
        "count": count,
        "set": entries,
        "del": deleted,
        "unpicklable": unpicklable,
        "source": source,
        "filename": filename,
        "inputs": _inputs(payload.get("inputs", [])),
        "interp": _interp(payload.get("interp", {})),
        "packages": list(packages),
        "files": _files(payload.get("files", [])),
    }
    if "full" in payload:
        full = payload["full"]
        if not isinstance(full, bool):
            raise _fail(f"'full' must be a bool, got {type(full).__name__}")
        result["full"] = full
    if "lossy" in payload:
        result["lossy"] = _slots(payload["lossy"], "lossy")
    if "recompute" in payload:
        result["recompute"] = _recompute(payload["recompute"])
    if "told" in payload:
        told = payload["told"]
        if not isinstance(told, list | tuple) or not all(
            isinstance(k, str) and len(k) <= 4096 for k in told
        ):
            raise _fail("'told' must be a list of str (warnings given, at most 4096 chars)")
        result["told"] = list(told)
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


class MergedState:
    """The effect of every completed cell so far, as one full payload can restore it: the
    entries still holding a current slot (oldest first), the latest interpreter state, the
    package installs in order, the inputs and the user modules' files.

    Owned by a replica's coordinator (fed on the log's thread) and by checkpoint rebuilds."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.entries: dict[str, Entry] = {}  # digest -> entry (with "live")
        self.owner: dict[str, str] = {}  # slot -> digest of the entry holding it
        self.interp: dict[str, bytes] = {}
        self.packages: list[Any] = []
        self.inputs: dict[int, list[Any]] = {}  # count -> [count, raw, transformed]
        self.files: dict[str, FileEntry] = {}
        self.unpicklable: set[str] = set()
        self.lossy: set[str] = set()  # slots whose copies are incomplete

    def _release(self, slot: str) -> None:
        self.lossy.discard(slot)
        digest = self.owner.pop(slot, None)
        if digest is None:
            return
        entry = self.entries.get(digest)
        if entry is None:
            return
        live = [s for s in entry.get("live", entry["slots"]) if s != slot]
        if live:
            entry["live"] = live
        else:
            del self.entries[digest]

    def merge(self, payload: Mapping[str, Any]) -> None:
        """Fold one validated payload in (a full payload replaces everything)."""
        if payload.get("full"):
            self._clear()
        for slot in (*payload["del"], *payload.get("unpicklable", ())):
            self._release(slot)
        self.unpicklable -= set(payload["del"])
        self.unpicklable |= set(payload.get("unpicklable", ()))
        for entry in payload["set"]:
            live = list(entry.get("live", entry["slots"]))
            for slot in live:
                self._release(slot)
                self.unpicklable.discard(slot)
            if not live:
                continue
            stored: Entry = {**entry, "live": live}  # type: ignore[typeddict-item]
            self.entries.pop(entry["h"], None)
            self.entries[entry["h"]] = stored
            for slot in live:
                self.owner[slot] = entry["h"]
            self.lossy |= set(live) & set(payload.get("lossy", ()))
        self.interp.update(payload.get("interp", {}))
        self.packages.extend(payload.get("packages", ()))
        for record in payload.get("inputs", ()):
            self.inputs[int(record[0])] = list(record)
        for file in payload.get("files", ()):
            self.files[file["path"]] = file

    def to_payload(self, count: int) -> SyncPayload:
        """The full payload that brings an empty replica to this state."""
        return {
            "count": count,
            "set": [dict(e) for e in self.entries.values()],  # type: ignore[misc]
            "del": [],
            "unpicklable": sorted(self.unpicklable),
            "source": "",
            "filename": "",
            "inputs": [record for _, record in sorted(self.inputs.items())],
            "interp": dict(self.interp),
            "packages": list(self.packages),
            "files": list(self.files.values()),
            "full": True,
            "lossy": sorted(self.lossy),
        }

    def to_primitive(self) -> dict[str, Any]:
        """For snapshots and checkpoints (msgpack)."""
        return dict(self.to_payload(0))

    @classmethod
    def from_primitive(cls, data: object) -> MergedState:
        """Inverse of ``to_primitive``; ``ValueError`` naming the problem."""
        state = cls()
        state.merge(validate_payload(data))
        return state

    def pointers(self) -> list[str]:
        """Store keys the current entries point to."""
        return [e["ptr"] for e in self.entries.values() if "ptr" in e]
