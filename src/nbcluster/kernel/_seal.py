"""Authenticating a kernel's state before anything of it is unpickled.

A replica unpickles what other replicas wrote: the records of its Raft log, the snapshots
that log ships, and the values, log entries and checkpoints in the object store. Unpickling
runs code, so every one of those is *sealed* by its writer and *opened* by its reader here,
and an object that does not open is refused before a byte of it is decoded.

* **The key** is per kernel: HMAC-SHA256 of the kernel's Jupyter HMAC key (the ``key`` of
  the replica's connection file, which the gateway generates, keeps in the kernel's record
  and gives every replica it starts, replacements and restored ones included) with the label
  ``b"nbcluster state v1"``. A key of its own, so that a signature on a Jupyter message can
  never be taken for one on state, nor the other way round. Jobs and the object store's other
  users do not get it.
* **A sealed object** is ``MAGIC`` (the format version), then the HMAC-SHA256 tag over the
  version, the object's *context* (length-prefixed) and its bytes, then the bytes. The context
  says what the object is: its store key (``store:kernels/K/log/000000000007``) or
  ``raft:record`` / ``raft:snapshot``. Binding the tag to the name stops an authentic object
  from being passed off as another (a checkpoint moved over a log entry, an old term's entry
  under a new term's name).
* :func:`open_sealed` checks with :func:`hmac.compare_digest` and raises :class:`ForgedState`
  naming the object and why (not sealed at all: written before nbcluster signed its state, or
  not by nbcluster; or a tag that does not match: forged, altered, truncated, or sealed under
  another name or key). :class:`Refusals` counts and logs refusals, never the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections import deque

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "RAFT_RECORD",
    "RAFT_SNAPSHOT",
    "STATE_KEY_LABEL",
    "ForgedState",
    "Refusals",
    "derive_state_key",
    "open_sealed",
    "seal",
    "store_context",
]

log = logging.getLogger(__name__)

#: The label the state key is derived with: one key, one meaning (and a version to rotate).
STATE_KEY_LABEL = b"nbcluster state v1"
#: The first bytes of every sealed object: the format (a new format gets a new magic).
MAGIC = b"NBS\x01"
_TAG_SIZE = hashlib.sha256().digest_size
HEADER_SIZE = len(MAGIC) + _TAG_SIZE
#: Contexts of what travels in the Raft log (store objects use :func:`store_context`).
RAFT_RECORD = "raft:record"
RAFT_SNAPSHOT = "raft:snapshot"


class ForgedState(ValueError):
    """A sealed object did not open: it is refused, never decoded. ``name`` says which object
    (a store key, or a Raft record's index), ``reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"refused {name}: {reason}")
        self.name = name
        self.reason = reason


def derive_state_key(kernel_key: bytes | str) -> bytes:
    """The kernel's state key from its Jupyter HMAC key. Raises ``ValueError`` for an empty
    key: without one nothing could be authenticated, so the replica must not join a group."""
    raw = kernel_key.encode() if isinstance(kernel_key, str) else bytes(kernel_key)
    if not raw:
        raise ValueError(
            "this replica has no per-kernel key (its connection file's 'key' is empty), so it "
            "cannot authenticate the kernel's state; a replicated kernel needs one"
        )
    return hmac.digest(raw, STATE_KEY_LABEL, "sha256")


def store_context(key: str) -> str:
    """The context of an object stored under ``key``."""
    return f"store:{key}"


def _tag(key: bytes, context: str, data: bytes | memoryview) -> bytes:
    label = context.encode()
    if len(label) > 0xFFFF:
        raise ValueError("a seal's context is at most 65535 bytes")
    mac = hmac.new(key, digestmod=hashlib.sha256)
    # Version, then the context with its length (so that no context/data split is ambiguous).
    mac.update(MAGIC)
    mac.update(len(label).to_bytes(2, "big"))
    mac.update(label)
    mac.update(data)
    return mac.digest()


def seal(key: bytes, context: str, data: bytes) -> bytes:
    """``data`` sealed for ``context`` under ``key`` (``HEADER_SIZE`` bytes longer)."""
    return b"".join((MAGIC, _tag(key, context, data), data))


def open_sealed(key: bytes, context: str, sealed: bytes, name: str | None = None) -> bytes:
    """The bytes ``sealed`` carries if it was sealed for ``context`` under ``key``; else
    :class:`ForgedState` naming ``name`` (default: the context). Nothing of an object that
    does not open is returned or decoded."""
    shown = context if name is None else name
    if len(sealed) < HEADER_SIZE or sealed[: len(MAGIC)] != MAGIC:
        raise ForgedState(
            shown,
            "it is not sealed with the kernel's state key (written before nbcluster signed "
            "its state, or not by nbcluster)",
        )
    view = memoryview(sealed)
    expected = _tag(key, context, view[HEADER_SIZE:])
    if not hmac.compare_digest(expected, view[len(MAGIC) : HEADER_SIZE]):
        raise ForgedState(
            shown,
            "its authentication tag does not match (forged, altered or truncated, or sealed "
            "under another name or for another kernel)",
        )
    return bytes(view[HEADER_SIZE:])


class Refusals:
    """The forged or altered objects one replica refused: each is logged (name and reason,
    never its bytes) and counted; the most recent names are kept. Thread-safe: the Raft
    thread, the store's worker threads and the event loop all refuse."""

    def __init__(self, keep: int = 64) -> None:
        self._lock = threading.Lock()
        self._recent: deque[tuple[int, str]] = deque(maxlen=keep)
        self.count = 0

    def note(self, error: ForgedState) -> None:
        with self._lock:
            self.count += 1
            self._recent.append((self.count, error.name))
        log.error("forged or altered state: %s", error)

    def mark(self) -> int:
        """A position to ask :meth:`since` about later."""
        with self._lock:
            return self.count

    def since(self, mark: int) -> list[str]:
        """The names refused after ``mark`` (as many as are kept)."""
        with self._lock:
            return [name for number, name in self._recent if number > mark]
