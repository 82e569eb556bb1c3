"""``nbcluster store ls|du|gc``: what the object store holds, and removing what no kernel needs."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from ._common import default_state_dir, read_runtime, store_option
from ._status import resolve_gateway

__all__ = ["store_group"]


def _open(store_url: str | None, state_dir: Path | None) -> Any:
    from ..store import StoreError, open_store

    root = state_dir or default_state_dir()
    runtime = read_runtime(root) or {}
    url = store_url or runtime.get("store") or (root / "store").resolve().as_uri()
    try:
        return open_store(url)
    except (ValueError, StoreError) as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _owner(key: str) -> str:
    parts = key.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "kernels" else "(no kernel)"


@click.group("store")
def store_group() -> None:
    """Inspect and clean the object store (large values of kernels)."""


@store_group.command("ls")
@click.argument("prefix", default="")
@store_option
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
def store_ls(prefix: str, store_url: str | None, state_dir: Path | None) -> None:
    """List objects (key and size) whose key starts with PREFIX."""
    from ..store import StoreError

    store = _open(store_url, state_dir)
    try:
        for info in store.list(prefix):
            click.echo(f"{info.size:>14}  {info.key}")
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@store_group.command("du")
@store_option
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
def store_du(store_url: str | None, state_dir: Path | None) -> None:
    """Space used per kernel."""
    from ..store import StoreError

    store = _open(store_url, state_dir)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    try:
        for info in store.list():
            entry = totals[_owner(info.key)]
            entry[0] += 1
            entry[1] += info.size
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    table = Table(title=f"Object store {store!r}")
    for column in ("kernel", "objects", "size"):
        table.add_column(column)
    for kernel, (count, size) in sorted(totals.items()):
        table.add_row(kernel, str(count), _size(size))
    table.add_row(
        "total",
        str(sum(c for c, _ in totals.values())),
        _size(sum(s for _, s in totals.values())),
    )
    Console().print(table)


@store_group.command("gc")
@store_option
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--url", help="Gateway URL (default: the running gateway).")
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's).")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
def store_gc(
    store_url: str | None,
    state_dir: Path | None,
    url: str | None,
    token: str | None,
    dry_run: bool,
) -> None:
    """Delete the objects of kernels that were shut down (and leftovers of interrupted
    writes). Only what is proven orphaned goes: a kernel's objects are deleted when the store
    holds its deletion mark (written by the gateway that shut it down) and the gateway does not
    know it. Anything else is kept, as it may be another gateway's on a shared store."""
    from ..client import GatewayClient, GatewayError
    from ..store import TOMBSTONE_PREFIX, StoreError, tombstone_key

    url, token = resolve_gateway(url, token, state_dir)

    async def kernel_ids() -> set[str]:
        async with GatewayClient(url, token, timeout=10) as client:
            return {k["id"] for k in await client.cluster_kernels()}

    try:
        known = asyncio.run(kernel_ids())
    except GatewayError as exc:
        raise click.ClickException(f"gateway at {url}: {exc}") from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(
            f"cannot reach the gateway at {url} to learn which kernels exist: {exc}"
        ) from None
    store = _open(store_url, state_dir)
    deleted = freed = 0
    kept: set[str] = set()
    try:
        tombstoned = {
            info.key[len(TOMBSTONE_PREFIX) :] for info in store.list(TOMBSTONE_PREFIX)
        } - known
        for info in list(store.list("kernels/")):
            owner = _owner(info.key)
            if owner in known:
                continue
            if owner not in tombstoned:
                kept.add(owner)
                continue
            if not dry_run:
                store.delete(info.key)
            deleted += 1
            freed += info.size
        extra = ""
        if not dry_run:
            for kernel_id in tombstoned:
                store.delete(tombstone_key(kernel_id))
            for cleanup in ("remove_stale_temporaries", "gc_orphans"):
                method = getattr(store, cleanup, None)
                if method is not None:
                    extra = f"; {method()} leftover(s) of interrupted writes removed"
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {deleted} object(s) ({_size(freed)}) of kernels that were shut down{extra}")
    if kept:
        click.echo(
            f"kept the objects of {len(kept)} kernel(s) this gateway does not know and that "
            "were not shut down (another gateway's on a shared store, or lost): "
            + ", ".join(sorted(kept)[:10])
            + (" ..." if len(kept) > 10 else "")
        )
