"""Proof that a kernel's objects are orphaned, for ``nbcluster store gc``.

A store may be shared by several gateways, so "no kernel of *this* gateway" proves nothing: the
objects may be another gateway's. When a gateway shuts a kernel down it first writes a
tombstone, ``gc/deleted-kernels/<kernel id>``, then deletes the kernel's objects (after the
retention), and the tombstone last. A tombstone thus proves that the kernel's owner deleted it
(kernel ids are random UUIDs, never reused): ``store gc`` deletes the objects of tombstoned
kernels only, and keeps every other key.
"""

from __future__ import annotations

__all__ = ["TOMBSTONE_PREFIX", "tombstone_key"]

TOMBSTONE_PREFIX = "gc/deleted-kernels/"


def tombstone_key(kernel_id: str) -> str:
    return f"{TOMBSTONE_PREFIX}{kernel_id}"
